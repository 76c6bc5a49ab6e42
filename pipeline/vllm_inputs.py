"""The CPU-stage half of the vLLM backend: the chat-templated prompt and the decoded images.

vLLM runs the checkpoint's own HF processor on the images it is given. So the CPU actors hand
it each image already resized to the size that processor resizes it to (its "working size"):
vLLM's resize then changes nothing (PIL and torchvision both return a same-size resize
unchanged), the pixels it feeds the vision tower are those it would have computed from the
full image, and a 2000x1500 photo crosses the object store and vLLM's frontend as ~1 MB
instead of 9 MB.

- LLaVA-1.5: the working image is the processor's own resized and centre-cropped 336x336
  output; re-processing it is the identity, so pixel_values are bit-identical.
- LLaVA-NeXT (AnyRes): the grid tiles are cut from the image resized into the best pinpoint
  resolution; the working image is exactly that resized image, cut back out of the
  processor's own tiles, so the grid tiles are bit-identical. The thumbnail tile (the whole
  image squashed to 336x336) is then resampled from the working image rather than the
  original -- close (mean difference under one uint8 level), not bit-identical. On the tiny
  prompt-sensitive test checkpoints that flips the first generated token on 1 of 8 photo sizes
  and the whole 16-token answer on 4 of 8 (tests/pipeline/test_vllm_inputs.py); LLaVA-1.5 answers
  are unchanged.
  The token count depends on the image's size (unpadding), so an image is only replaced when
  the working size keeps the best resolution and the token count, and is no coarser than the
  thumbnail in either direction; otherwise it goes as is (3-4% of photo sizes with aspect
  ratios up to 3:1, for the token count; strips wider than about 3:1 for the thumbnail).

Token counts come from the processor's `_get_num_multimodal_tokens` (the helper transformers
keeps for vLLM) and one tokenizer call, not a second image pass: `input_ids` are the text's ids
with each `<image>` repeated to its feature count, which is what the processor produces
(checked in tests) and what the Preprocessor's context-length check needs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .checkpoint import Checkpoint
from .errors import PromptError
from .records import PreparedRequest

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)


def _processed(image_processor, image: "Image.Image") -> np.ndarray | None:
    """The processor's resized/cropped/tiled uint8 output for one image, before rescale and
    normalise: [3, H, W] (LLaVA) or [tiles, 3, H, W] (NeXT). None if it is not uint8."""
    pixels = image_processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    if pixels.dtype != np.uint8:  # an image processor that rescales anyway: pixels cannot be reused
        logger.warning("%s returned %s pixels; sending images to vLLM at full size", type(image_processor).__name__, pixels.dtype)
        return None
    return pixels


def _llava_working_image(processor, image: "Image.Image") -> np.ndarray | None:
    """LLaVA-1.5: the 336x336 image the processor makes, if smaller than the original."""
    ip = processor.image_processor
    crop = ip.crop_size
    if crop["height"] * crop["width"] >= image.height * image.width:
        return None
    pixels = _processed(ip, image)  # [3, 336, 336]
    return None if pixels is None else np.ascontiguousarray(pixels.transpose(1, 2, 0))


def _anyres_working_image(processor, image: "Image.Image") -> np.ndarray | None:
    """LLaVA-NeXT: the image resized into its best pinpoint, cut out of the processor's tiles."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension

    ip = processor.image_processor
    size = (image.height, image.width)
    best = select_best_resolution(size, ip.image_grid_pinpoints)
    shape_only = np.broadcast_to(np.uint8(0), (*size, 3))  # get_patch_output_size reads the shape only
    new_h, new_w = get_patch_output_size(shape_only, best, ChannelDimension.LAST)
    if new_h * new_w >= size[0] * size[1]:
        return None
    # The thumbnail is resampled from the working image: it must not have fewer rows or columns
    # than the thumbnail takes from the original (a 37x1500 strip would lose a third of its rows).
    thumb = ip.crop_size
    if new_h < min(size[0], thumb["height"]) or new_w < min(size[1], thumb["width"]):
        return None
    counts = processor._get_num_multimodal_tokens(image_sizes=[size, (new_h, new_w)]).num_image_tokens
    if select_best_resolution((new_h, new_w), ip.image_grid_pinpoints) != best or counts[0] != counts[1]:
        logger.debug("image %s: working size %s would change the tokens; sent as is", size, (new_h, new_w))
        return None
    tiles = _processed(ip, image)  # [1 + rows*cols, 3, p, p]: the thumbnail, then the grid row by row
    if tiles is None:
        return None
    p = tiles.shape[-1]
    rows, cols = best[0] // p, best[1] // p
    if tiles.shape[0] != 1 + rows * cols:
        logger.warning("unexpected AnyRes tiling %s for %s; sending images to vLLM at full size", tiles.shape, best)
        return None
    canvas = tiles[1:].reshape(rows, cols, 3, p, p).transpose(0, 3, 1, 4, 2).reshape(rows * p, cols * p, 3)
    top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2  # the processor pads evenly, extra at the end
    return np.ascontiguousarray(canvas[top : top + new_h, left : left + new_w])


WORKING_IMAGE: dict[str, Callable[[Any, "Image.Image"], np.ndarray | None]] = {
    "llava": _llava_working_image,
    "llava_next": _anyres_working_image,
}


def working_images(checkpoint: Checkpoint, images: list["Image.Image"]) -> list[np.ndarray]:
    """Each image as [H, W, 3] uint8 at the size the model uses (or as is, see the module doc)."""
    shrink = WORKING_IMAGE[checkpoint.family.name]
    out = []
    for image in images:
        small = shrink(checkpoint.processor, image)
        out.append(small if small is not None else np.asarray(image if image.mode == "RGB" else image.convert("RGB")))
    return out


def expanded_ids(checkpoint: Checkpoint, prompt: str, sizes: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """The prompt's token ids with each image placeholder repeated to its feature count, and
    the number of image tokens: what the processor would produce, without touching pixels."""
    processor = checkpoint.processor
    ids = np.asarray(processor.tokenizer(prompt)["input_ids"], dtype=np.int32)
    slots = np.flatnonzero(ids == checkpoint.image_token_id)
    if len(slots) != len(sizes):
        raise PromptError(
            f"{len(slots)} image placeholders for {len(sizes)} image(s); "
            f"the text must not contain the image token {processor.image_token!r}"
        )
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[slots] = counts
    return np.repeat(ids, repeats), int(sum(counts))


def encode_for_vllm(checkpoint: Checkpoint, request_id: Any, prompt: str, images: list["Image.Image"]) -> PreparedRequest:
    """prompt + decoded RGB images -> PreparedRequest for the vLLM engines (`images` at working size)."""
    arrays = working_images(checkpoint, images)
    sizes = [(a.shape[0], a.shape[1]) for a in arrays]
    input_ids, image_tokens = expanded_ids(checkpoint, prompt, sizes)
    return PreparedRequest(
        id=request_id,
        prompt=prompt,
        input_ids=input_ids,
        image_tokens=image_tokens,
        image_sizes=sizes,  # of the images vLLM gets; NeXT counts its tokens from these
        images=arrays,
    )
