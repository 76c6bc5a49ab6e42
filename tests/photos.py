"""Phone-sized photos and the checkpoint processor's tiles of them, for the reduced-decode tests.

The reference is always transformers' image processor on the fully decoded, upright photo (what
the model card runs), independent of pipeline code.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageOps

from tests.conftest import photo, saved


def picture(name: str, h: int, w: int) -> Image.Image:
    """A real scikit-image photo resized to h x w (upscaled, as a phone photo's size)."""
    return Image.fromarray(photo(name)).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)


@functools.lru_cache(maxsize=16)
def encoded(name: str, h: int, w: int, fmt: str = "JPEG") -> bytes:
    """`picture` encoded: JPEG at quality 90 (a phone's), or lossless. Cached: tests share them."""
    return saved(picture(name, h, w), fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def processor_tiles(image_processor, data: bytes) -> np.ndarray:
    """The processor's uint8 tiles of the fully decoded photo: [tiles, 3, H, W]."""
    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    pixels = image_processor(images=[full], do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    return pixels if pixels.ndim == 4 else pixels[None]


def tile_differences(ours: np.ndarray, theirs: np.ndarray) -> tuple[np.ndarray, int]:
    """Each tile's mean absolute difference in uint8 levels, and the largest single one."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    return diff.mean(axis=(1, 2, 3)), int(diff.max())
