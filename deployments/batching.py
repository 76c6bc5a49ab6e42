"""Adaptive batching for a blocking engine: no wait when the model is idle, company when it is busy.

Serve's `@serve.batch` waits `batch_wait_timeout_s` after a batch's first request even when the
model is idle; with a timeout of 0 it forms the next batch while the current one still runs, so
every request queued behind a batch becomes a batch of its own. Here one loop takes what is
queued when the model becomes free: a request that finds the model idle starts at once, those
that arrive while a batch runs form the next one (up to `max_batch_size`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class AdaptiveBatcher(Generic[T, R]):
    """`await submit(item)` -> its result from `run(batch)`, which gets one call at a time.

    A caller that goes away (its task cancelled) before its batch starts is left out of it.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_batch_size: int):
        self._run, self.max_batch_size = run, max_batch_size
        self._queue: deque[tuple[T, asyncio.Future]] = deque()
        self._ready = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    async def submit(self, item: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._ready.set()
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._serve())
        return await future

    def _take(self) -> list[tuple[T, asyncio.Future]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # done here means cancelled: its caller left
                batch.append((item, future))
        if not self._queue:
            self._ready.clear()
        return batch

    async def _serve(self) -> None:
        while True:
            await self._ready.wait()
            batch = self._take()
            if not batch:
                continue
            try:
                results = await self._run([item for item, _ in batch])
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
