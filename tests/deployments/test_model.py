"""The model deployment's logic (deployments/model.py) as a plain class, without Serve: its engine's
life and its health check, on a real tiny model."""

import asyncio
import dataclasses
import gc
import weakref

import numpy as np
import pytest

from deployments.model import LlavaModelServer
from pipeline.config import load_config
from pipeline.errors import EngineDead


def test_the_replica_closes_its_engine_when_serve_stops_it(tiny_llava):
    """Serve calls the replica's `__del__` when it stops it: the engine is closed then, the
    model's weights freed (vLLM's worker processes stopped), not orphaned."""
    server = LlavaModelServer(load_config({"model": {"name": tiny_llava}}))
    engine = server.engine
    model = weakref.ref(engine.model)
    server.__del__()  # what Serve's ReplicaActor.call_destructor calls
    gc.collect()
    assert engine.model is None and model() is None
    server.__del__()  # a second call (the object's own collection) does nothing


def test_the_health_check_tells_a_failed_request_from_an_engine_that_cannot_serve(tiny_llava):
    """A request that fails on its own leaves the replica healthy (the check's known-good
    request succeeds); once the loaded model is really broken (its weights dropped to the meta
    device: every generate fails) the check raises, and requests are refused as EngineDead (a
    503 at the ingress) instead of run."""
    cfg = load_config({"model": {"name": tiny_llava}, "generation": {"max_new_tokens": 4}})
    server = LlavaModelServer(cfg)
    good = server._probe
    image_token = int(np.bincount(good.input_ids).argmax())  # the expanded image run is most of the prompt
    bad = dataclasses.replace(good, id="bad", input_ids=good.input_ids[good.input_ids != image_token])

    async def scenario():
        assert (await server.generate(bad, cfg.generation)).error.startswith("engine: ")
        await server.check_health()  # the request's own fault: the probe succeeds
        assert (await server.generate(good, cfg.generation)).error is None
        server.engine.model.to("meta")
        assert (await server.generate(good, cfg.generation)).error.startswith("engine: ")
        with pytest.raises(EngineDead, match="a known-good request failed: engine: "):
            await server.check_health()
        with pytest.raises(EngineDead):
            await server.generate(good, cfg.generation)
        with pytest.raises(EngineDead):
            await anext(server.stream(good, cfg.generation))

    asyncio.run(scenario())
    server.__del__()


def test_a_batch_runs_each_requests_own_sampling_settings(tiny_llava):
    """Requests that arrive together form one batch, grouped by sampling settings: each answer
    equals the same request run alone (its own max_new_tokens and stop; a seeded sampled request
    in an engine call of its own, so its seed decides its answer whatever else was in flight)."""
    from pipeline.config import GenerationConfig
    from pipeline.records import Record
    from tests.conftest import preprocessor, resized

    cfg = load_config({"model": {"name": tiny_llava}, "serve": {"max_batch_size": 8}})
    server = LlavaModelServer(cfg)
    pre = preprocessor(cfg)
    r0, r1, r2, r3 = [pre.prepare(Record(id=i, images=[resized(name, 96, 128)], prompt=f"What is in picture {i}?"))
                      for i, name in enumerate(["coffee", "astronaut", "chelsea", "rocket"])]
    eight = GenerationConfig(max_new_tokens=8, min_new_tokens=8)
    seeded = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=7)

    async def scenario():
        text = (await server.generate(r1, eight)).text
        assert len(text) >= 4, text
        stop = eight.model_copy(update={"stop": [text[len(text) // 2:len(text) // 2 + 2]]})  # cuts the answer short
        cases = [(r0, eight), (r1, eight), (r2, GenerationConfig(max_new_tokens=3, min_new_tokens=3)), (r1, stop),
                 (r2, seeded), (r3, seeded)]
        singles = [await server.generate(r, s) for r, s in cases]
        calls, run = [], server._engine_generate

        async def counted(batch, sampling):  # the size of each engine call
            calls.append(len(batch))
            return await run(batch, sampling)

        server._engine_generate = counted
        together = await asyncio.gather(*(server.generate(r, s) for r, s in cases))
        return singles, together, calls

    singles, together, calls = asyncio.run(scenario())
    server.__del__()
    assert calls == [2, 1, 1, 1, 1]  # one batch of six: both `eight` requests share a call, each other group its own
    assert [(r.text, r.completion_tokens) for r in together] == [(r.text, r.completion_tokens) for r in singles]
    assert [r.completion_tokens for r in singles[:3]] == [8, 8, 3] and len(singles[3].text) < len(singles[1].text)
