"""The adaptive batcher (deployments/batching.py) on a plain event loop: when a batch starts and
what it holds, decided by the order of events, never by a clock."""

import asyncio

import pytest

from deployments.batching import AdaptiveBatcher


async def _turns(n: int = 20) -> None:
    """Let the event loop run n rounds without letting time matter (no timer is waited for)."""
    for _ in range(n):
        await asyncio.sleep(0)


class Model:
    """Records each batch it is called with; the first one holds until `release` is set, as
    a long generation holds the model."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()

    async def run(self, batch: list[int]) -> list[int]:
        self.calls.append(list(batch))
        if len(self.calls) == 1:
            await self.release.wait()
        if 13 in batch:
            raise ValueError("unlucky batch")
        return [x * 10 for x in batch]


async def busy(max_batch_size: int) -> tuple[Model, AdaptiveBatcher, asyncio.Task]:
    """A batcher whose model runs the first request, which found it idle."""
    model = Model()
    batcher = AdaptiveBatcher(model.run, max_batch_size)
    first = asyncio.create_task(batcher.submit(1))
    await _turns()
    assert model.calls == [[1]]  # started alone, without waiting for company
    return model, batcher, first


def test_an_idle_model_starts_at_once_and_arrivals_during_a_batch_form_the_next():
    async def scenario():
        model, batcher, first = await busy(max_batch_size=4)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(2, 8)]
        await _turns()
        assert model.calls == [[1]]  # one batch at a time: the others wait for the model
        model.release.set()
        results = await asyncio.gather(first, *rest)
        assert results == [10, 20, 30, 40, 50, 60, 70]
        assert model.calls == [[1], [2, 3, 4, 5], [6, 7]]  # gathered, up to max_batch_size
        assert await batcher.submit(8) == 80 and model.calls[-1] == [8]  # idle again: alone, at once

    asyncio.run(scenario())


def test_a_caller_that_left_is_not_batched_and_a_failed_batch_fails_only_its_callers():
    async def scenario():
        model, batcher, first = await busy(max_batch_size=8)
        gone, unlucky, other = (asyncio.create_task(batcher.submit(i)) for i in (2, 13, 3))
        await _turns()
        gone.cancel()
        model.release.set()
        assert await first == 10
        with pytest.raises(ValueError, match="unlucky batch"):
            await unlucky
        with pytest.raises(ValueError, match="unlucky batch"):
            await other  # in the same batch as 13
        assert model.calls == [[1], [13, 3]]
        assert await batcher.submit(4) == 40  # the batcher keeps serving

    asyncio.run(scenario())
