"""The model deployment's logic (deployments/model.py) as a plain class, without Serve."""

import gc
import weakref

from deployments.model import LlavaModelServer
from pipeline.config import load_config


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
