"""Setting combinations that cannot work, caught before any work starts (one line each).

`check_combinations` looks at the config alone (run by validation); `check_environment` also
looks at this machine (installed packages, CUDA) and runs at `check-config`, job start and app
build. Neither silently changes a setting.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config
    from .families import FamilySpec

logger = logging.getLogger(__name__)


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
    """A CUDA GPU here, or a Ray cluster to run on: on KubeRay the job driver and Serve's app
    builder run on a head without GPUs, and GPU workers may still be scaling up from zero, so
    there GPU placement is Ray's scheduling to do, not a reason to refuse the config."""
    import torch

    if torch.cuda.is_available() or os.environ.get("RAY_ADDRESS"):
        return True
    import ray

    return ray.is_initialized()


def check_environment(cfg: "Config") -> None:
    """Raise ValueError naming the setting and the fix when this machine cannot run `cfg`."""
    if cfg.backend == "vllm":
        if not _has("vllm"):
            raise ValueError("backend: 'vllm' needs the vllm extra: pip install 'llava-ray[vllm]'")
        if not cuda_available():
            raise ValueError("backend: 'vllm' needs a CUDA GPU and none is visible; use backend=transformers")
        check_vllm_settings(cfg, *vllm_model_facts(cfg))
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


def vllm_model_facts(cfg: "Config") -> tuple["FamilySpec", int, int]:
    """(family, context length, most tokens one image takes) read from the checkpoint's files."""
    from transformers import AutoConfig

    from .families import resolve_model_name
    from .preprocess import load_family, load_processor
    from .vllm_inputs import max_image_tokens

    model_config = AutoConfig.from_pretrained(resolve_model_name(cfg.model.name), revision=cfg.model.revision)
    return load_family(cfg), model_config.text_config.max_position_embeddings, max_image_tokens(load_processor(cfg))


def check_vllm_settings(cfg: "Config", family: "FamilySpec", context_len: int, image_tokens: int) -> None:
    """vLLM settings that would fail the engine's start or every large row, caught up front."""
    r, v = cfg.resources, cfg.vllm
    if r.num_gpus_per_actor != v.tensor_parallel_size:
        raise ValueError(
            f"resources.num_gpus_per_actor: {r.num_gpus_per_actor:g}, but backend 'vllm' runs one engine per model "
            f"actor on vllm.tensor_parallel_size={v.tensor_parallel_size} whole GPU(s); "
            f"set resources.num_gpus_per_actor={v.tensor_parallel_size}"
        )
    images = min(family.max_images_per_prompt, cfg.limits.max_images_per_row)
    if v.limit_mm_per_prompt < images:
        raise ValueError(
            f"vllm.limit_mm_per_prompt: {v.limit_mm_per_prompt}, but rows may hold {images} images "
            f"({family.name}, limits.max_images_per_row={cfg.limits.max_images_per_row}); "
            f"set vllm.limit_mm_per_prompt={images} or limits.max_images_per_row={v.limit_mm_per_prompt}"
        )
    if v.max_model_len > context_len:
        raise ValueError(
            f"vllm.max_model_len: {v.max_model_len} exceeds the model's context of {context_len} tokens; "
            f"set vllm.max_model_len={context_len} or less"
        )
    one = image_tokens + cfg.generation.max_new_tokens
    if v.max_model_len < one:
        raise ValueError(
            f"vllm.max_model_len: {v.max_model_len} cannot hold one {family.name} image ({image_tokens} tokens at most) "
            f"+ generation.max_new_tokens={cfg.generation.max_new_tokens}; set vllm.max_model_len to at least "
            f"{one} plus the prompt's text, or lower generation.max_new_tokens"
        )
    if images > 1 and v.max_model_len < images * image_tokens + cfg.generation.max_new_tokens:
        logger.warning(
            "vllm.max_model_len=%d holds fewer than %d large %s images; rows with more fail with a length error",
            v.max_model_len, images, family.name,
        )
