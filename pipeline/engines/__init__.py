"""Engines behind one protocol (`base.Engine`); `make_engine` picks one from the config."""

from __future__ import annotations

from ..config import Config
from .base import Engine


def make_engine(cfg: Config) -> Engine:
    if cfg.backend == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(cfg)
    from .hf import HFEngine

    return HFEngine(cfg)
