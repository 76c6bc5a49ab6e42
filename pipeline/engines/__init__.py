"""The engines behind the two protocols of `base`; `engine_class` picks one from the config."""

from __future__ import annotations

from ..checkpoint import SCIPY, Checkpoint
from ..config import Config
from .base import AsyncEngine, Engine


def engine_class(cfg: Config) -> type:
    """vLLM: its async engine (the endpoint streams from it; the job keeps batches in flight on
    it). transformers: the blocking HFEngine, batched by the caller."""
    if cfg.backend == "vllm":
        from .vllm_engine import VLLMAsyncEngine

        return VLLMAsyncEngine
    from .hf import HFEngine

    return HFEngine


def model_checkpoint(cfg: Config) -> Checkpoint:
    """The checkpoint, opened by a process of ours that runs the model (a model actor, a model
    replica): on transformers, scipy is left out first (`checkpoint.leave_out`). vLLM keeps what
    it finds."""
    return Checkpoint.load(cfg.model, unused=() if cfg.backend == "vllm" else SCIPY)


def make_engine(cfg: Config, checkpoint: Checkpoint) -> Engine | AsyncEngine:
    return engine_class(cfg)(cfg, checkpoint)
