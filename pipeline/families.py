"""Model families and presets: model variants are data, not branches (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_class: str  # transformers class that loads the checkpoint
    hf_model_types: tuple[str, ...]  # config.json `model_type` values of this family
    max_images_per_prompt: int  # what the model was trained with / the processor accepts


FAMILIES: dict[str, FamilySpec] = {
    "llava": FamilySpec("llava", "LlavaForConditionalGeneration", ("llava",), max_images_per_prompt=1),
    "llava_next": FamilySpec(
        "llava_next", "LlavaNextForConditionalGeneration", ("llava_next",), max_images_per_prompt=4
    ),
}

# Short names for real checkpoints, usable as `model.name`.
PRESETS: dict[str, str] = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-v1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-v1.6-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-v1.6-vicuna-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
    "llava-v1.6-34b": "llava-hf/llava-v1.6-34b-hf",
    "llava-interleave-qwen-0.5b": "llava-hf/llava-interleave-qwen-0.5b-hf",
    "llava-interleave-qwen-7b": "llava-hf/llava-interleave-qwen-7b-hf",
    "llama3-llava-next-8b": "llava-hf/llama3-llava-next-8b-hf",
    "llava-next-72b": "llava-hf/llava-next-72b-hf",
}


def family_spec(name: str) -> FamilySpec:
    key = name.replace("-", "_")
    if key not in FAMILIES:
        raise ConfigError("model.family", f"unknown family {name!r}; allowed: {sorted(FAMILIES)} or 'auto'")
    return FAMILIES[key]
