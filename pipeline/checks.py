"""What this machine must have to run a config, checked once per entry point before any work.

`check_environment` looks at installed packages, CUDA and the checkpoint itself, and raises a
one-line ConfigError naming the setting and the fix. Setting combinations that are wrong on
any machine are the config's own validators (pipeline/config.py). Nothing here changes a setting.
"""

from __future__ import annotations

import importlib.util
import logging
import os

from .checkpoint import Checkpoint
from .config import Config
from .errors import ConfigError

logger = logging.getLogger(__name__)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _on_cluster() -> bool:
    """A Ray cluster to attach to (RAY_ADDRESS), or a Ray this process already started."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    import ray

    return ray.is_initialized()


def cuda_available() -> bool:
    """A CUDA GPU here, or a Ray cluster to run on: on KubeRay the job driver and Serve's app
    builder run on a head without GPUs, and GPU workers may still be scaling up from zero, so
    there GPU placement is Ray's scheduling to do, not a reason to refuse the config."""
    import torch

    return torch.cuda.is_available() or _on_cluster()


def asks_for_a_gpu(cfg: Config) -> bool:
    """Settings that need a CUDA GPU: only for these does `check_environment` ask torch
    (`cuda_available`), so otherwise the checking process can do without torch."""
    return cfg.backend == "vllm" or cfg.model.device == "cuda" or cfg.model.attn_implementation == "flash_attention_2"


def _check_gpu_settings(cfg: Config) -> None:
    if cfg.backend == "vllm":
        if not _has("vllm"):
            raise ConfigError("backend", "'vllm' needs the vllm extra: pip install 'llava-ray[vllm]'")
        if not cuda_available():
            raise ConfigError("backend", "'vllm' needs a CUDA GPU and none is visible; use backend=transformers")
    if cfg.model.device == "cuda" and not cuda_available():
        raise ConfigError("model.device", "'cuda' but no CUDA GPU is visible; use model.device=auto or cpu")
    if cfg.model.attn_implementation == "flash_attention_2":
        if not cuda_available():
            raise ConfigError("model.attn_implementation", "flash_attention_2 needs a CUDA GPU; use sdpa")
        if not _has("flash_attn"):
            raise ConfigError("model.attn_implementation", "flash_attention_2 needs: pip install flash-attn; or use sdpa")


def check_environment(cfg: Config) -> Checkpoint:
    """Raise ConfigError when this machine cannot run `cfg`; return the checkpoint it opened."""
    if asks_for_a_gpu(cfg):
        _check_gpu_settings(cfg)
    if cfg.model.quantization.mode != "none" and not _has("bitsandbytes"):
        raise ConfigError("model.quantization.mode", f"{cfg.model.quantization.mode} needs: pip install 'llava-ray[quant]'")
    for key in ("preprocess_resources", "model_resources"):
        if getattr(cfg.resources, key) and not _on_cluster():
            raise ConfigError(f"resources.{key}", "custom resources need a Ray cluster whose nodes declare them "
                              "(RAY_ADDRESS); an embedded Ray has none, so the pool would never start")
    checkpoint = Checkpoint.load(cfg.model)
    if cfg.backend == "vllm":
        check_vllm_settings(cfg, checkpoint)
    return checkpoint


def check_vllm_settings(cfg: Config, checkpoint: Checkpoint) -> None:
    """vLLM settings that would fail the engine's start or every large row, caught up front."""
    r, v, family = cfg.resources, cfg.vllm, checkpoint.family
    if r.num_gpus_per_actor != v.tensor_parallel_size:
        raise ConfigError(
            "resources.num_gpus_per_actor",
            f"{r.num_gpus_per_actor:g}, but backend 'vllm' runs one engine per model actor on "
            f"vllm.tensor_parallel_size={v.tensor_parallel_size} whole GPU(s); "
            f"set resources.num_gpus_per_actor={v.tensor_parallel_size}",
        )
    images = cfg.images_per_row(checkpoint.max_images)
    if v.limit_mm_per_prompt < images:
        raise ConfigError(
            "vllm.limit_mm_per_prompt",
            f"{v.limit_mm_per_prompt}, but rows may hold {images} images "
            f"({family.name}, limits.max_images_per_row={cfg.limits.max_images_per_row}); "
            f"set vllm.limit_mm_per_prompt={images} or limits.max_images_per_row={v.limit_mm_per_prompt}",
        )
    if v.max_model_len > checkpoint.context_len:
        raise ConfigError(
            "vllm.max_model_len",
            f"{v.max_model_len} exceeds the model's context of {checkpoint.context_len} tokens; "
            f"set vllm.max_model_len={checkpoint.context_len} or less",
        )
    image_tokens = checkpoint.images.max_tokens
    one = image_tokens + cfg.generation.max_new_tokens
    if v.max_model_len < one:
        raise ConfigError(
            "vllm.max_model_len",
            f"{v.max_model_len} cannot hold one {family.name} image ({image_tokens} tokens at most) "
            f"+ generation.max_new_tokens={cfg.generation.max_new_tokens}; set vllm.max_model_len to at least "
            f"{one} plus the prompt's text, or lower generation.max_new_tokens",
        )
    if images > 1 and v.max_model_len < images * image_tokens + cfg.generation.max_new_tokens:
        logger.warning(
            "vllm.max_model_len=%d holds fewer than %d large %s images; rows with more fail with a length error",
            v.max_model_len, images, family.name,
        )
