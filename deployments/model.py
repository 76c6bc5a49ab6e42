"""The model deployment's logic: one Engine, requests batched across callers (no Serve wiring).

Engines differ in who batches. A blocking `Engine` (transformers) runs one `generate` per batch,
so concurrent requests are gathered with `@serve.batch` and the batch runs in a thread (the event
loop keeps accepting the next batch meanwhile). An `AsyncEngine` (vLLM's) batches internally and
is awaited per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Callable, Iterator

from ray import serve

from pipeline.checkpoint import Checkpoint
from pipeline.config import Config, GenerationConfig, ServeConfig
from pipeline.engines import make_engine
from pipeline.engines.base import AsyncEngine, release
from pipeline.metrics import BATCH_SIZE, STREAMS_ABORTED, metric
from pipeline.records import PreparedRequest, Result

logger = logging.getLogger(__name__)

_DEFAULT_BATCH = ServeConfig.model_fields["max_batch_size"].default
_DEFAULT_WAIT = ServeConfig.model_fields["batch_wait_timeout_s"].default
_END = object()


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


class LlavaModelServer:
    """Holds the Engine; batch sizes are observable as the llava_ray_batch_size histogram."""

    def __init__(self, cfg: Config):
        self.engine = make_engine(cfg, Checkpoint.load(cfg.model))
        self._generate_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        logger.info("model deployment ready: %s (%s)", self.engine.model_name, self.engine.backend)

    def __del__(self):
        """Serve calls this when the replica stops: the engine goes with it (vLLM's worker
        processes would otherwise outlive the replica)."""
        release(getattr(self, "engine", None))  # None when __init__ failed before the engine

    async def generate(self, request: PreparedRequest, sampling: GenerationConfig) -> Result:
        if isinstance(self.engine, AsyncEngine):
            [result] = await self.engine.agenerate([request], sampling)
            return result
        return await self._generate_batch((request, sampling))

    @serve.batch(max_batch_size=_DEFAULT_BATCH, batch_wait_timeout_s=_DEFAULT_WAIT)
    async def _generate_batch(self, items: list[tuple[PreparedRequest, GenerationConfig]]) -> list[Result]:
        metric(BATCH_SIZE).observe(len(items))
        groups: dict[str, list[int]] = {}
        for i, (_, sampling) in enumerate(items):
            groups.setdefault(_group_key(i, sampling), []).append(i)
        results: list[Result | None] = [None] * len(items)
        for indices in groups.values():
            sampling = items[indices[0]][1]
            batch = [items[i][0] for i in indices]
            for i, result in zip(indices, await asyncio.to_thread(self.engine.generate, batch, sampling)):
                results[i] = result
        return results

    async def stream(self, request: PreparedRequest, sampling: GenerationConfig) -> AsyncIterator[str | Result]:
        """Text deltas, then the request's Result (usage and finish_reason for the last chunk).
        A caller that goes away closes this generator, which stops the engine's generation
        (counted as llava_ray_streams_aborted_total)."""
        finished = False
        items = self.engine.astream(request, sampling) if isinstance(self.engine, AsyncEngine) else \
            _iterate_in_thread(lambda: self.engine.stream(request, sampling))
        try:
            async for item in items:
                finished = isinstance(item, Result)
                yield item
        finally:
            if not finished:
                await items.aclose()
                metric(STREAMS_ABORTED).inc()
