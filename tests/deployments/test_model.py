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
