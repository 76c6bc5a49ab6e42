"""Setting combinations that cannot work, caught before any work starts (one line each).

`check_combinations` looks at the config alone (run by validation); `check_environment` also
looks at this machine (installed packages, CUDA) and runs at `check-config`, job start and app
build. Neither silently changes a setting.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config


def check_combinations(cfg: "Config") -> None:
    if cfg.backend == "vllm":
        if cfg.model.quantization.mode != "none":
            raise ValueError(
                "model.quantization.mode: bitsandbytes 4/8-bit runs on backend 'transformers' only; "
                "set model.quantization.mode=none for vllm (or use a pre-quantized AWQ/GPTQ checkpoint)"
            )
        if cfg.model.device == "cpu":
            raise ValueError("model.device: backend 'vllm' runs on GPU only; set model.device=auto or backend=transformers")
    if cfg.model.attn_implementation == "flash_attention_2" and cfg.model.device == "cpu":
        raise ValueError("model.attn_implementation: flash_attention_2 needs a GPU; use sdpa on CPU")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_environment(cfg: "Config") -> None:
    """Raise ValueError naming the setting and the fix when this machine cannot run `cfg`."""
    if cfg.backend == "vllm":
        if not _has("vllm"):
            raise ValueError("backend: 'vllm' needs the vllm extra: pip install 'llava-ray[vllm]'")
        if not cuda_available():
            raise ValueError("backend: 'vllm' needs a CUDA GPU and none is visible; use backend=transformers")
    if cfg.model.device == "cuda" and not cuda_available():
        raise ValueError("model.device: 'cuda' but no CUDA GPU is visible; use model.device=auto or cpu")
    if cfg.model.attn_implementation == "flash_attention_2":
        if not cuda_available():
            raise ValueError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa")
        if not _has("flash_attn"):
            raise ValueError("model.attn_implementation: flash_attention_2 needs: pip install flash-attn; or use sdpa")
    if cfg.model.quantization.mode != "none" and not _has("bitsandbytes"):
        raise ValueError(
            f"model.quantization.mode: {cfg.model.quantization.mode} needs: pip install 'llava-ray[quant]'"
        )
