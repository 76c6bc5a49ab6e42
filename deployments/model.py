"""The model deployment's logic: one Engine, requests batched across callers (no Serve wiring).

Engines differ in who batches. A blocking `Engine` (transformers) runs one `generate` per batch,
so concurrent requests are gathered by an `AdaptiveBatcher` and the batch runs in a thread (the
event loop keeps accepting the next batch meanwhile). An `AsyncEngine` (vLLM's) batches
internally and is awaited per request.

Health: Serve calls `check_health` every serve.health_check_period_s and replaces a replica
whose check raises. The engine cannot serve once it raised `EngineDead` (vLLM's engine died, a
CUDA error poisoned the device); after calls that failed otherwise, the check runs one short
generation of a known-good request to tell a request's own fault from a broken engine.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from typing import Any, AsyncIterator, Callable, Iterator

import numpy as np
from PIL import Image

from pipeline.checkpoint import Checkpoint
from pipeline.config import Config, GenerationConfig
from pipeline.engines import make_engine, model_checkpoint
from pipeline.engines.base import AsyncEngine, poisons_device, release
from pipeline.errors import EngineDead
from pipeline.metrics import BATCH_SIZE, STREAMS_ABORTED, metric
from pipeline.preprocess import Preprocessor
from pipeline.records import PreparedRequest, Record, Result

from .batching import AdaptiveBatcher

logger = logging.getLogger(__name__)

_END = object()
_PROBE_SAMPLING = GenerationConfig(max_new_tokens=1)  # greedy, one token: the cheapest real generation


def _group_key(index: int, sampling: GenerationConfig) -> str:
    """Requests that can share one `generate` call. Greedy ignores the seed; a seeded sampled
    request runs alone, so its seed gives the same answer whatever else was in flight."""
    if sampling.greedy:
        return sampling.model_dump_json(exclude={"seed"})
    return sampling.model_dump_json() if sampling.seed is None else f"seeded-{index}"


async def _iterate_in_thread(make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Drive a blocking iterator from its own thread (not the default pool, which long streams
    would exhaust). When the consumer stops early the thread closes the iterator itself:
    closing it from here could race a `next` in flight."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def pump() -> None:
        iterator = make()
        try:
            for item in iterator:
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(items.put_nowait, (item, None))
            loop.call_soon_threadsafe(items.put_nowait, (_END, None))
        except BaseException as e:
            loop.call_soon_threadsafe(items.put_nowait, (_END, e))
        finally:
            iterator.close()

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            item, error = await items.get()
            if error is not None:
                raise error
            if item is _END:
                break
            yield item
    finally:
        stop.set()


def probe_request(cfg: Config, checkpoint: Checkpoint) -> PreparedRequest:
    """A request any working engine answers: a grey image and the default prompt, prepared as
    the ingress prepares requests."""
    image = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image, "PNG")
    record = Record(id="health-probe", images=[image.getvalue()])
    return Preprocessor(cfg, checkpoint, local_ok=False).prepare(record, _PROBE_SAMPLING.max_new_tokens)


class LlavaModelServer:
    """Holds the Engine; batch sizes are observable as the llava_ray_batch_size histogram."""

    def __init__(self, cfg: Config):
        checkpoint = model_checkpoint(cfg)
        self.engine = make_engine(cfg, checkpoint)
        self._probe = probe_request(cfg, checkpoint)
        self._batcher = AdaptiveBatcher(self._generate_batch, cfg.serve.max_batch_size)
        self._dead: str | None = None  # why the engine cannot serve any more
        self._failing = False  # a call failed since the last one that succeeded
        logger.info("model deployment ready: %s (%s)", self.engine.model_name, self.engine.backend)

    def __del__(self):
        """Serve calls this when the replica stops: the engine goes with it (vLLM's worker
        processes would otherwise outlive the replica)."""
        release(getattr(self, "engine", None))  # None when __init__ failed before the engine

    async def check_health(self) -> None:
        """Raise when the engine can no longer serve, so that Serve replaces this replica."""
        if self._dead is None and self._failing:
            [result] = await self._engine_generate([self._probe], _PROBE_SAMPLING)
            if result.error:
                self._dead = f"a known-good request failed: {result.error}"
        if self._dead is not None:
            logger.error("unhealthy, to be replaced: %s", self._dead)
            raise EngineDead(self._dead)

    def _observe(self, error: BaseException | None, results: list[Result] = ()) -> None:
        """Track the engine's state from a call's outcome; an error that leaves the engine
        unusable marks the replica dead."""
        if isinstance(error, EngineDead) or (error is not None and poisons_device(error)):
            self._dead = self._dead or f"{type(error).__name__}: {error}"
        self._failing = error is not None or any(r.error for r in results)

    async def _engine_generate(self, requests: list[PreparedRequest], sampling: GenerationConfig) -> list[Result]:
        if self._dead is not None:
            raise EngineDead(self._dead)
        try:
            if isinstance(self.engine, AsyncEngine):
                results = await self.engine.agenerate(requests, sampling)
            else:
                results = await asyncio.to_thread(self.engine.generate, requests, sampling)
        except Exception as e:
            self._observe(e)
            raise
        self._observe(None, results)
        return results

    async def generate(self, request: PreparedRequest, sampling: GenerationConfig) -> Result:
        if isinstance(self.engine, AsyncEngine):
            [result] = await self._engine_generate([request], sampling)
            return result
        return await self._batcher.submit((request, sampling))

    async def _generate_batch(self, items: list[tuple[PreparedRequest, GenerationConfig]]) -> list[Result]:
        metric(BATCH_SIZE).observe(len(items))
        groups: dict[str, list[int]] = {}
        for i, (_, sampling) in enumerate(items):
            groups.setdefault(_group_key(i, sampling), []).append(i)
        results: list[Result | None] = [None] * len(items)
        for indices in groups.values():
            sampling = items[indices[0]][1]
            batch = [items[i][0] for i in indices]
            for i, result in zip(indices, await self._engine_generate(batch, sampling)):
                results[i] = result
        return results

    async def stream(self, request: PreparedRequest, sampling: GenerationConfig) -> AsyncIterator[str | Result]:
        """Text deltas, then the request's Result (usage and finish_reason for the last chunk).
        A caller that goes away closes this generator, which stops the engine's generation
        (counted as llava_ray_streams_aborted_total)."""
        if self._dead is not None:
            raise EngineDead(self._dead)
        finished = False
        items = self.engine.astream(request, sampling) if isinstance(self.engine, AsyncEngine) else \
            _iterate_in_thread(lambda: self.engine.stream(request, sampling))
        try:
            async for item in items:
                finished = isinstance(item, Result)
                yield item
        except Exception as e:
            self._observe(e)
            if self._dead is not None:
                raise EngineDead(self._dead) from e
            raise
        finally:
            if not finished:
                await items.aclose()
                metric(STREAMS_ABORTED).inc()
        self._observe(None, [item])
