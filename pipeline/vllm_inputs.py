"""The CPU-stage half of the vLLM backend: the chat-templated prompt and the decoded images.

vLLM runs the checkpoint's own HF processor on the images it is given. So the CPU actors hand
it each image already resized to the size that processor resizes it to (its "working size"),
computed by pipeline/pixels.py from the photo as decoded (large photos at reduced scale, the same
decode and resize as the transformers backend's tiles): vLLM's resize then changes nothing (PIL
and torchvision both return a same-size resize unchanged), and a 2000x1500 photo crosses the
object store and vLLM's frontend as ~1 MB instead of 9 MB.

- LLaVA-1.5: the working image is the resized and centre-cropped 336x336 tile; re-processing it
  is the identity, so vLLM's pixel_values are the transformers backend's tiles: bit-identical
  to the PIL processor on the full photo when it is not reduced (pipeline/pixels.py).
- LLaVA-NeXT (AnyRes): the working image is the photo resized into its best pinpoint resolution,
  from which vLLM cuts the same grid tiles as the transformers backend. The thumbnail tile (the
  whole image squashed to 336x336) is then resampled from the working image rather than the
  photo -- close (mean difference under one uint8 level), not bit-identical. On the tiny
  prompt-sensitive test checkpoints that flips the first generated token on 1 of 8 photo sizes
  and the whole 16-token answer on 4 of 8 (tests/pipeline/test_vllm_inputs.py); LLaVA-1.5 answers
  are unchanged.
  The token count depends on the image's size (unpadding), so an image is only replaced when
  the working size keeps the photo's best resolution and token count, and is no coarser than the
  thumbnail in either direction; otherwise it goes as decoded (3-4% of photo sizes with aspect
  ratios up to 3:1, for the token count; strips wider than about 3:1 for the thumbnail), and a
  photo is only decoded reduced when that keeps them too.
- `preprocess.exact: true` sends every image as decoded at full size: vLLM's processor then
  sees exactly the model card's input.

Token counts come from the checkpoint's `ImageFacts.tokens` (the processor's own expansion rule,
pipeline/image_facts.py) and one tokenizer call, not a second image pass: `input_ids` are the text's ids
with each `<image>` repeated to its feature count, which is what the processor produces
(checked in tests) and what the Preprocessor's context-length check needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .checkpoint import Checkpoint
from .errors import PromptError
from .pixels import Decoded, Pixels
from .records import PreparedRequest


def working_images(pixels: Pixels | None, images: list[Decoded]) -> list[np.ndarray]:
    """Each image as [H, W, 3] uint8 at the size the model uses, or as decoded (see the module
    doc); `pixels` None (preprocess.exact, or a processor pipeline/pixels.py does not reproduce):
    every image as decoded, at full size."""
    out = []
    for d in images:
        small = pixels.working(d) if pixels else None
        out.append(small if small is not None else np.asarray(d.image))
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
    counts = checkpoint.images.tokens(sizes)
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[slots] = counts
    return np.repeat(ids, repeats), int(sum(counts))


def encode_for_vllm(checkpoint: Checkpoint, request_id: Any, prompt: str, images: list[Decoded], pixels: Pixels | None) -> PreparedRequest:
    """prompt + decoded RGB images -> PreparedRequest for the vLLM engines (`images` at working size)."""
    arrays = working_images(pixels, images)
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
