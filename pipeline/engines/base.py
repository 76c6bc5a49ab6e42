"""The engine contracts shared by the offline job and the endpoint (no Ray, no I/O).

record -> Preprocessor -> PreparedRequest -> engine -> Result. Two protocols: `Engine` blocks
(transformers; the vLLM `LLM`), `AsyncEngine` is awaited (vLLM's AsyncLLM). Callers choose by
type (`isinstance` / `is_async`), never by probing attributes. Both carry the labels every output
row records: `model_name` and `backend`, set by `EngineLabels`.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator, Callable, Iterator, Protocol, runtime_checkable

from ..config import Config, GenerationConfig
from ..errors import EngineDead, EngineError
from ..records import PreparedRequest, Result

logger = logging.getLogger(__name__)


class EngineLabels:
    """`model_name` (as configured) and `backend` (what ran, e.g. "transformers/float32/sdpa",
    "vllm/bfloat16"). Kept out of the protocols: protocols with data members cannot be used
    with issubclass, which the job needs to pick its stage class before any engine exists."""

    model_name: str
    backend: str

    def __init__(self, model_name: str, backend: str):
        self.model_name, self.backend = model_name, backend


@runtime_checkable
class Engine(Protocol):
    """A loaded model called from a thread."""

    def generate(self, requests: list[PreparedRequest], sampling: GenerationConfig) -> list[Result]:
        """One Result per request, in order. A row's failure is that row's `error`, never a raise."""
        ...

    def stream(self, request: PreparedRequest, sampling: GenerationConfig) -> Iterator[str | Result]:
        """Yield text deltas of one request, then its `Result`; the deltas join to its text."""
        ...

    def close(self) -> None:
        """Free the model now (its memory, any worker processes); the owner calls it when it
        ends (`release`). Calling it again does nothing."""
        ...


@runtime_checkable
class AsyncEngine(Protocol):
    """A loaded model awaited on an event loop; it batches concurrent calls itself."""

    async def agenerate(self, requests: list[PreparedRequest], sampling: GenerationConfig) -> list[Result]:
        """As `Engine.generate`; raises only `EngineDead`."""
        ...

    def astream(self, request: PreparedRequest, sampling: GenerationConfig) -> AsyncIterator[str | Result]:
        """As `Engine.stream`, asynchronously."""
        ...

    def close(self) -> None:
        """As `Engine.close`."""
        ...


def is_async(engine_type: type) -> bool:
    """Whether instances of `engine_type` are awaited (AsyncEngine) or called (Engine)."""
    if issubclass(engine_type, AsyncEngine):
        return True
    if issubclass(engine_type, Engine):
        return False
    raise TypeError(f"{engine_type.__name__} implements neither Engine nor AsyncEngine")


def release(engine: Engine | AsyncEngine | None) -> None:
    """Close the engine of an actor or replica that is ending (its `__del__`, which Ray Data
    and Serve call on a graceful stop): never raises, a destructor must not."""
    if engine is None:
        return
    try:
        engine.close()
    except Exception:
        logger.warning("closing the engine failed", exc_info=True)


# What torch says after a CUDA error that leaves the process's device context unusable: every
# later kernel fails too, so the actor must go (Ray restarts it), not fail row after row.
_DEVICE_LOST = ("cuda error", "device-side assert", "illegal memory access", "illegal instruction",
                "unspecified launch failure", "cublas_status_execution_failed", "cudnn_status_execution_failed",
                "misaligned address", "uncorrectable ecc error")


def poisons_device(error: BaseException) -> bool:
    """Whether `error` means the engine can no longer run in this process: a torch
    `RuntimeError` (`torch.AcceleratorError` is one) whose text reports a lost CUDA context. Out
    of memory is not: freeing the batch recovers, and the row fallback retries smaller."""
    import torch

    if not isinstance(error, RuntimeError) or isinstance(error, torch.OutOfMemoryError):
        return False
    text = str(error).lower()
    return "out of memory" not in text and any(marker in text for marker in _DEVICE_LOST)


def resolve_device(cfg: Config) -> str:
    import torch

    if cfg.model.device != "auto":
        return cfg.model.device
    wants_gpu = cfg.resources.num_gpus_per_actor > 0 or cfg.backend == "vllm"
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def resolve_dtype(cfg: Config, device: str) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if device == "cuda" else "float32"


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` before the first stop string (OpenAI semantics: the stop is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def failed(request: PreparedRequest, error: Exception) -> Result:
    return Result.failed(request.id, EngineError.wrap(error), request.prompt_tokens, request.image_tokens)


def generate_with_row_fallback(
    run_batch: Callable[[list[PreparedRequest]], list[Result]], requests: list[PreparedRequest]
) -> list[Result]:
    """Run a batch; if it raises, retry row by row so one bad row (or a batch too big for
    memory) fails alone with an `engine: ...` error instead of taking its batch with it. An error
    that leaves the device unusable (`poisons_device`) is `EngineDead` instead: no row is to blame."""
    if not requests:
        return []
    try:
        return run_batch(requests)
    except EngineDead:
        raise
    except Exception as e:
        if poisons_device(e):
            raise EngineDead(f"{type(e).__name__}: {' '.join(str(e).split())}") from e
        if len(requests) == 1:
            logger.warning("row %r failed in the engine: %s", requests[0].id, e)
            return [failed(requests[0], e)]
        logger.warning("batch of %d failed (%s: %s); retrying row by row", len(requests), type(e).__name__, e)
        return [res for r in requests for res in generate_with_row_fallback(run_batch, [r])]
