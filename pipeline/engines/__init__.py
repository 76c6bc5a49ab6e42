"""Engines behind one protocol (`base.Engine`); `make_engine` picks one from the config."""

from __future__ import annotations

from ..config import Config
from .base import Engine


def make_engine(cfg: Config, *, asynchronous: bool = False) -> Engine:
    """asynchronous=True (vLLM): the async engine with agenerate/astream, for Serve and for the
    offline stage's batches in flight; the transformers engine serves both ways."""
    if cfg.backend == "vllm":
        from .vllm_engine import VLLMAsyncEngine, VLLMEngine

        return VLLMAsyncEngine(cfg) if asynchronous else VLLMEngine(cfg)
    from .hf import HFEngine

    return HFEngine(cfg)
