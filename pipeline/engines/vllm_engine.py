"""vLLM engines behind the `Engine` protocol (no Ray; vllm is imported only when one is built).

- `VLLMEngine`: `vllm.LLM`, one `generate` call per batch (sync; tests, simple offline use).
- `VLLMAsyncEngine`: vLLM's `AsyncLLM`. The endpoint streams from it, and the offline job's
  model stage awaits it with several batches in flight, so the engine's continuous batching
  admits the next batch while the last one decodes and the GPU never waits on Python.

Both take what `pipeline.vllm_inputs.encode_for_vllm` prepared: the chat-templated prompt and
the images at the model's working size; vLLM applies the checkpoint's own processor to them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator, Iterator

from ..checkpoint import Checkpoint
from ..config import Config, GenerationConfig
from ..errors import EngineDead, EngineError
from ..records import PreparedRequest, Result
from .base import EngineLabels, failed, generate_with_row_fallback

logger = logging.getLogger(__name__)


def engine_args(cfg: Config, checkpoint: Checkpoint) -> dict[str, Any]:
    """Config -> keyword arguments of `vllm.LLM` / `vllm.AsyncEngineArgs` (vLLM 0.26 names)."""
    v = cfg.vllm
    return dict(
        model=checkpoint.path,
        revision=checkpoint.revision,
        dtype=cfg.model.dtype,  # "auto": vLLM reads the checkpoint's dtype and what the GPU supports
        max_model_len=v.max_model_len,
        limit_mm_per_prompt={"image": v.limit_mm_per_prompt},
        gpu_memory_utilization=v.gpu_memory_utilization,
        tensor_parallel_size=v.tensor_parallel_size,
        # The engine's GPUs are the ones Ray gave this actor: workers as local processes
        # ("mp"), never Ray placement groups that would ask the cluster for more.
        distributed_executor_backend="uni" if v.tensor_parallel_size == 1 else "mp",
        enforce_eager=v.enforce_eager,
        enable_prefix_caching=v.enable_prefix_caching,
        mm_processor_cache_gb=v.mm_processor_cache_gb,
        max_num_seqs=v.max_num_seqs,
        load_format=v.load_format,
    )


def sampling_params(sampling: GenerationConfig, output_kind: str = "FINAL_ONLY"):
    """GenerationConfig -> vllm.SamplingParams; temperature 0 is greedy in both backends."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=sampling.max_new_tokens,
        min_tokens=sampling.min_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,  # the stop string is cut from the text, as in OpenAI
        output_kind=RequestOutputKind[output_kind],
    )


def vllm_prompt(request: PreparedRequest) -> dict[str, Any]:
    """{"prompt", "multi_modal_data"}: vLLM tokenises the text and expands each image itself."""
    from PIL import Image

    return {"prompt": request.prompt, "multi_modal_data": {"image": [Image.fromarray(im) for im in request.images]}}


def to_result(request: PreparedRequest, prompt_token_ids, text: str, n_tokens: int, finish_reason: str | None) -> Result:
    """What vLLM reported for a finished request -> Result (token counts as vLLM saw them)."""
    prompt_tokens = len(prompt_token_ids or ())
    if finish_reason not in ("stop", "length"):  # "abort" / "error" / "repetition"
        return Result.failed(request.id, EngineError(f"request ended with {finish_reason!r}"), prompt_tokens, request.image_tokens)
    return Result(request.id, text, finish_reason, prompt_tokens, request.image_tokens, n_tokens)


def final_result(request: PreparedRequest, output) -> Result:
    """A finished vllm.RequestOutput (FINAL_ONLY or CUMULATIVE) -> Result."""
    c = output.outputs[0]
    return to_result(request, output.prompt_token_ids, c.text, len(c.token_ids), c.finish_reason)


def dtype_label(dtype: Any) -> str:
    """The backend label of the dtype vLLM resolved (a torch dtype): vllm/float16, ..."""
    return f"vllm/{str(dtype).removeprefix('torch.')}"


class VLLMEngine(EngineLabels):
    """`vllm.LLM`: `generate` hands the whole batch to one `LLM.generate` call."""

    def __init__(self, cfg: Config, checkpoint: Checkpoint):
        from vllm import LLM

        start = time.perf_counter()
        self.llm = LLM(**engine_args(cfg, checkpoint))
        super().__init__(checkpoint.name, dtype_label(self.llm.llm_engine.model_config.dtype))
        logger.info("vLLM engine for %s (%s) ready in %.1f s", self.model_name, self.backend, time.perf_counter() - start)

    def generate(self, requests: list[PreparedRequest], sampling: GenerationConfig) -> list[Result]:
        params = sampling_params(sampling)

        def run_batch(batch: list[PreparedRequest]) -> list[Result]:
            # A failing prompt makes vLLM abort the ones already added and raise: no half batches.
            outputs = self.llm.generate([vllm_prompt(r) for r in batch], params, use_tqdm=False)
            return [final_result(r, o) for r, o in zip(batch, outputs)]

        return generate_with_row_fallback(run_batch, requests)

    def stream(self, request: PreparedRequest, sampling: GenerationConfig) -> Iterator[str | Result]:
        """`LLM` has no incremental output: the whole text as one delta, then the Result."""
        [result] = self.generate([request], sampling)
        if result.text:
            yield result.text
        yield result

    def close(self) -> None:
        """Stop the engine-core process now (it otherwise goes when the LLM is collected)."""
        self.llm.llm_engine.engine_core.shutdown()


class VLLMAsyncEngine(EngineLabels):
    """vLLM's `AsyncLLM`: every request is its own stream, so rows fail alone and batches from
    concurrent callers share the engine's continuous batching."""

    def __init__(self, cfg: Config, checkpoint: Checkpoint):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        start = time.perf_counter()
        # Built outside any event loop is fine: AsyncLLM starts its output handler on the loop
        # of the first request (Ray Data's UDF loop or the Serve replica's).
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**engine_args(cfg, checkpoint)))
        super().__init__(checkpoint.name, dtype_label(self.engine.model_config.dtype))
        logger.info("vLLM async engine for %s (%s) ready in %.1f s", self.model_name, self.backend, time.perf_counter() - start)

    def _stream(self, request: PreparedRequest, params):
        return self.engine.generate(vllm_prompt(request), params, request_id=f"{request.id}-{uuid.uuid4().hex}")

    def _dead_check(self, error: Exception) -> None:
        if self.engine.errored:
            raise EngineDead(f"vLLM engine died: {error}") from error

    async def _final(self, request: PreparedRequest, params) -> Result:
        try:
            output = None
            async for output in self._stream(request, params):
                pass
            return final_result(request, output)
        except Exception as e:
            self._dead_check(e)
            logger.warning("row %r failed in the engine: %s", request.id, e)
            return failed(request, e)

    async def agenerate(self, requests: list[PreparedRequest], sampling: GenerationConfig) -> list[Result]:
        """One Result per request, in order; raises only `EngineDead`."""
        params = sampling_params(sampling)
        return list(await asyncio.gather(*(self._final(r, params) for r in requests)))

    async def astream(self, request: PreparedRequest, sampling: GenerationConfig) -> AsyncIterator[str | Result]:
        """Text deltas as vLLM produces them (DELTA outputs), then the request's `Result`, as
        `HFEngine.stream` does; an engine error propagates to the caller."""
        text, n_tokens, output = "", 0, None
        try:
            async for output in self._stream(request, sampling_params(sampling, "DELTA")):
                delta = output.outputs[0]
                n_tokens += len(delta.token_ids)
                if delta.text:
                    text += delta.text
                    yield delta.text
        except Exception as e:
            self._dead_check(e)
            raise
        yield to_result(request, output.prompt_token_ids, text, n_tokens, output.outputs[0].finish_reason)

    def close(self) -> None:
        self.engine.shutdown()
