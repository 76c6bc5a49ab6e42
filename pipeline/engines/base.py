"""The engine contract shared by the offline job and the endpoint (no Ray, no I/O).

record -> Preprocessor -> PreparedRequest -> Engine.generate -> Result
"""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from ..config import GenerationConfig

logger = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    """What the CPU stage hands the model stage: compact, so it is cheap to move between actors.

    For transformers: `input_ids` already hold one `<image>` token per image feature, and
    `tiles` are the processor's resized/cropped tiles as uint8 (the model side rescales and
    normalises). For vLLM: `prompt` and the decoded RGB `images` are what the engine takes.
    """

    id: Any
    prompt: str
    input_ids: np.ndarray  # [L] int32, image tokens expanded
    image_tokens: int = 0
    tiles: np.ndarray | None = None  # [total_tiles, 3, H, W] uint8 (all images of the row)
    tiles_per_image: list[int] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) as decoded
    images: list[np.ndarray] = field(default_factory=list)  # [H, W, 3] uint8, vLLM only

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Result:
    id: Any
    text: str | None
    finish_reason: str | None  # "stop" | "length" | None on error
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @classmethod
    def failed(cls, request_id: Any, error: str, prompt_tokens: int = 0, image_tokens: int = 0) -> "Result":
        return cls(request_id, None, None, prompt_tokens, image_tokens, 0, error)


class Engine(Protocol):
    """A loaded model. `model_name` and `backend` label every output row."""

    model_name: str
    backend: str  # e.g. "transformers/float32/sdpa", "vllm/bfloat16"

    def generate(self, requests: list[PreparedRequest], sampling: GenerationConfig) -> list[Result]:
        """One Result per request, in order. A row's failure is that row's `error`, never a raise."""
        ...

    def stream(self, request: PreparedRequest, sampling: GenerationConfig) -> Iterator[str | Result]:
        """Yield text deltas of one request, then its `Result`; the deltas join to its text."""
        ...


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` before the first stop string (OpenAI semantics: the stop is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def failed(request: PreparedRequest, error: Exception) -> Result:
    return Result.failed(request.id, f"engine: {type(error).__name__}: {error}", request.prompt_tokens, request.image_tokens)


def generate_with_row_fallback(
    run_batch: Callable[[list[PreparedRequest]], list[Result]], requests: list[PreparedRequest]
) -> list[Result]:
    """Run a batch; if it raises, retry row by row so one bad row (or a batch too big for
    memory) fails alone with an `engine: ...` error instead of taking its batch with it."""
    if not requests:
        return []
    try:
        return run_batch(requests)
    except Exception as e:
        if len(requests) == 1:
            logger.warning("row %r failed in the engine: %s", requests[0].id, e)
            return [failed(requests[0], e)]
        logger.warning("batch of %d failed (%s: %s); retrying row by row", len(requests), type(e).__name__, e)
        return [res for r in requests for res in generate_with_row_fallback(run_batch, [r])]
