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


def family_spec(name: str) -> FamilySpec:
    key = name.replace("-", "_")
    if key not in FAMILIES:
        raise ConfigError("model.family", f"unknown family {name!r}; allowed: {sorted(FAMILIES)} or 'auto'")
    return FAMILIES[key]
