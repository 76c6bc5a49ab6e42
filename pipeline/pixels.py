"""What the model sees of a photo, computed from as few decoded pixels as possible.

The checkpoint's processor resizes a 12 MP photo to a few hundred pixels a side with one bicubic
resample of the full image, after converting it PIL -> numpy -> PIL. Here the photo is decoded
reduced instead (`pipeline.images.decode_image`: JPEG DCT scaling, else an integer box
reduction) as far as `fits` allows, and the processor's own geometry -- its resize, centre crop,
AnyRes best resolution, padding and tiles -- is applied to that with PIL directly, mapping the
whole photo onto the same output pixels (`Decoded.box`).

- A photo less than 2 x `MARGIN` (2.8) times what the processor resizes it to is never reduced, and
  its tiles are bit-identical to those of transformers' PIL image processors (tested).
- A reduced one keeps at least `MARGIN` times the pixels the processor resamples to in each
  direction: tiles within 1 uint8 level on average of the processor's on the full photo
  (tests/pipeline/test_pixels.py; benchmarks/preprocess.py). Sizes come from the photo's own
  size (`Decoded.size`), so the token count and the model's AnyRes unpadding are unchanged.

Both classes read the processor through `ImageFacts` (pipeline/image_facts.py), the one place
that knows each processor class. `pixels_for` returns None for settings whose steps this module
does not reproduce; the Preprocessor then runs that processor on the full image, as
`preprocess.exact: true` does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from .image_facts import ImageFacts

logger = logging.getLogger(__name__)

# The reduced image keeps at least this many pixels per pixel the processor resamples it to, in
# each direction (twice the pixels): the closer the two-step resample (reduce, then the
# processor's bicubic) comes to 1x, the further it drifts from one bicubic of the full photo.
# Measured on LLaVA-1.5's 448x336 from photos reduced 2x (JPEG q90 / PNG), mean difference in
# uint8 levels at 1.04x / 1.25x / 1.37x / 1.5x / 2x: 1.38 / 0.91 / 0.74 / 0.61 / 0.36 on the
# Hubble deep field (scikit-image's worst case: point sources), 0.98 / 0.62 / 0.53 / 0.47 / 0.29
# on the astronaut. It also leaves every photo under 2.8x the model's input size unreduced.
MARGIN = math.sqrt(2)

Size = tuple[int, int]  # (height, width)
Fits = Callable[[Size, Size], bool]  # (photo size, reduced size) -> still enough for the model


@dataclass(frozen=True)
class Decoded:
    """An upright RGB image and the photo it was decoded from."""

    image: Image.Image
    size: Size  # (height, width) of the upright photo as encoded: what the model counts tokens from
    scale: int = 1  # `image` is the photo reduced `scale` times, each side rounded up

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The photo's extent in `image`'s pixels: a rounded-up last row or column is partial."""
        return (0.0, 0.0, self.size[1] / self.scale, self.size[0] / self.scale)

    def resized(self, height: int, width: int, resample: int) -> np.ndarray:
        """The whole photo resampled to height x width: [H, W, 3] uint8."""
        return np.asarray(self.image.resize((width, height), resample, box=self.box))


def _fits_margin(reduced: Size, need: Size) -> bool:
    return reduced[0] >= MARGIN * need[0] and reduced[1] >= MARGIN * need[1]


class LlavaPixels:
    """LLaVA-1.5 (CLIP 336, SigLIP 384): resize (shortest edge, or a fixed height x width), then an
    optional centre crop: one tile, [1, 3, H, W]. The vLLM working image is that tile itself."""

    def __init__(self, facts: ImageFacts):
        self.facts = facts
        self.resample = facts.resample
        self.crop = facts.crop

    def resized(self, size: Size) -> Size:
        """The size the processor resizes a `size` image to."""
        if self.facts.shortest_edge:
            from transformers.image_transforms import get_resize_output_image_size
            from transformers.image_utils import ChannelDimension

            shape_only = np.broadcast_to(np.uint8(0), (*size, 3))  # only its shape is read
            return tuple(get_resize_output_image_size(shape_only, self.facts.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.LAST))
        return self.facts.resize_to

    def fits(self, size: Size, reduced: Size) -> bool:
        return _fits_margin(reduced, self.resized(size))

    def _tile(self, d: Decoded) -> np.ndarray:
        """Resize, then crop. (Resampling only the crop's box is cheaper but not bit-identical:
        PIL may then run its two passes in the other order.)"""
        th, tw = self.resized(d.size)
        ch, cw = self.crop or (th, tw)
        top, left = (th - ch) // 2, (tw - cw) // 2
        return d.resized(th, tw, self.resample)[top : top + ch, left : left + cw]

    def tiles(self, d: Decoded) -> np.ndarray:
        return np.ascontiguousarray(self._tile(d).transpose(2, 0, 1)[None])

    def working(self, d: Decoded) -> np.ndarray | None:
        """The tile, when it is smaller than the photo: re-processing it is the identity."""
        tile = self._tile(d)
        return tile if tile.shape[0] * tile.shape[1] < d.size[0] * d.size[1] else None


class AnyResPixels:
    """LLaVA-NeXT: the photo resized into its best pinpoint resolution, padded and cut into
    patch x patch tiles, after a thumbnail of the whole photo: [1 + rows * cols, 3, p, p]."""

    def __init__(self, facts: ImageFacts):
        self.facts = facts
        self.resample = facts.resample
        self.pinpoints = [list(p) for p in facts.pinpoints]
        self.patch = facts.tile[0]
        self.thumb = self.thumbnail(facts)

    @staticmethod
    def thumbnail(facts: ImageFacts) -> Size:
        """The thumbnail's size, as the processor reads it from its `size`."""
        return facts.resize_to or (facts.shortest_edge, facts.shortest_edge)

    def plan(self, size: Size) -> tuple[Size, Size]:
        """(best resolution, the size the photo is resized to inside it), as the processor chooses."""
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
        from transformers.image_utils import ChannelDimension

        best = tuple(select_best_resolution(size, self.pinpoints))
        shape_only = np.broadcast_to(np.uint8(0), (*size, 3))  # only its shape is read
        return best, tuple(get_patch_output_size(shape_only, best, ChannelDimension.LAST))

    def fits(self, size: Size, reduced: Size) -> bool:
        """Besides the margin: a reduced image that vLLM gets as is (see `working`) must make its
        processor choose the same best resolution, resize and token count as the photo."""
        plan = self.plan(size)
        grid = plan[1]
        need = (max(grid[0], self.thumb[0]), max(grid[1], self.thumb[1]))
        if not _fits_margin(reduced, need) or self.plan(reduced) != plan:
            return False
        a, b = self.facts.tokens([size, reduced])
        return a == b

    def tiles(self, d: Decoded) -> np.ndarray:
        (bh, bw), (nh, nw) = self.plan(d.size)
        p = self.patch
        canvas = np.zeros((bh, bw, 3), np.uint8)
        top, left = (bh - nh) // 2, (bw - nw) // 2  # the processor pads evenly, any odd pixel at the end
        canvas[top : top + nh, left : left + nw] = d.resized(nh, nw, self.resample)
        out = np.empty((1 + (bh // p) * (bw // p), 3, p, p), np.uint8)
        out[0] = d.resized(*self.thumb, self.resample).transpose(2, 0, 1)
        out[1:].reshape(bh // p, bw // p, 3, p, p)[:] = canvas.reshape(bh // p, p, bw // p, p, 3).transpose(0, 2, 4, 1, 3)
        return out

    def working(self, d: Decoded) -> np.ndarray | None:
        """The photo resized into its best resolution: vLLM's processor cuts the same grid tiles
        from it (its resize changes nothing). Only when that is smaller than the photo, keeps the
        best resolution and the token count, and is no coarser than the thumbnail in either
        direction (the thumbnail is then resampled from it: close, not bit-identical)."""
        size = d.size
        best, (nh, nw) = self.plan(size)
        if nh * nw >= size[0] * size[1]:
            return None
        if nh < min(size[0], self.thumb[0]) or nw < min(size[1], self.thumb[1]):
            return None  # a 37x1500 strip's thumbnail would lose a third of its rows
        a, b = self.facts.tokens([size, (nh, nw)])
        if self.plan((nh, nw))[0] != best or a != b:
            logger.debug("image %s: working size %s would change the tokens; sent as decoded", size, (nh, nw))
            return None
        return d.resized(nh, nw, self.resample)


Pixels = LlavaPixels | AnyResPixels



def _why_not(facts: ImageFacts) -> str | None:
    """Why the processor's steps are not the ones reproduced here, or None if they are. (Every
    class ImageFacts knows is reproduced: the PIL backends bit-identically, tested; their
    torchvision twins with the same geometry, whose own bicubic differs from PIL's by its
    antialiasing.)"""
    if not facts.do_resize or not isinstance(facts.resample, int):
        return f"it does not resize with a PIL filter (do_resize={facts.do_resize}, resample={facts.resample!r})"
    if not facts.anyres:
        smallest = (facts.shortest_edge,) * 2 if facts.shortest_edge else facts.resize_to
        if facts.do_pad or facts.crop and (facts.crop[0] > smallest[0] or facts.crop[1] > smallest[1]):
            return "it pads"
        return None
    p = facts.tile[0]
    if facts.crop != (p, p) or AnyResPixels.thumbnail(facts) != (p, p):
        return "its tiles are resized or cropped again after tiling"
    if any(h % p or w % p for h, w in facts.pinpoints):
        return f"a pinpoint is not a multiple of the {p}-pixel tile"
    return None


def pixels_for(facts: ImageFacts) -> Pixels | None:
    """The fast path for this checkpoint's image processor, or None (then: the processor, full size)."""
    why = _why_not(facts)
    if why:
        logger.info("images are processed at full size by the checkpoint's processor: %s", why)
        return None
    return AnyResPixels(facts) if facts.anyres else LlavaPixels(facts)
