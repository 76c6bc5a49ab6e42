"""Model families and presets: model variants are data, not branches."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


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
}


def family_spec(name: str) -> FamilySpec:
    key = name.replace("-", "_")
    if key not in FAMILIES:
        raise ValueError(f"model.family: unknown family {name!r}; allowed: {sorted(FAMILIES)} or 'auto'")
    return FAMILIES[key]


def resolve_model_name(name: str) -> str:
    """A preset short name -> its hub id; `tiny-llava[-next]` -> the cached tiny checkpoint's
    path; anything else (hub id, local path) unchanged."""
    from .tiny import TINY_NAMES, ensure_tiny

    if name in TINY_NAMES:
        return str(ensure_tiny(name))
    return PRESETS.get(name, name)


def detect_family(model_name: str, revision: str | None = None) -> FamilySpec:
    """Read the checkpoint's config.json (local path or hub, no weights) and map its model_type."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(resolve_model_name(model_name), revision=revision).model_type
    for spec in FAMILIES.values():
        if model_type in spec.hf_model_types:
            return spec
    raise ValueError(
        f"model.name: {model_name!r} is a {model_type!r} checkpoint; llava-ray runs "
        f"{sorted(t for s in FAMILIES.values() for t in s.hf_model_types)}"
    )
