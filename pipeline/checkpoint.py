"""Open a checkpoint once: its family, its processor, and the model-config facts every stage needs.

The Preprocessor, both engines, the vLLM input code and the start-up checks all take the same
`Checkpoint` instead of each calling `from_pretrained` on the config and processor again. Only the
model weights are loaded elsewhere (by the engine that runs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import ModelConfig
from .errors import ConfigError, first_line
from .families import FAMILIES, FamilySpec, family_spec
from .image_facts import ImageFacts
from .layouts import PRESETS, matching


def resolve_model_name(name: str) -> str:
    """A preset short name -> its hub id; `tiny-llava[-next]` -> the cached tiny checkpoint's
    path (built on first use); anything else (hub id, local path) unchanged."""
    from .tiny import TINY_NAMES, ensure_tiny

    if name in TINY_NAMES:
        return str(ensure_tiny(name))
    return PRESETS.get(name, name)


TORCH = ("torch", "torchvision")  # never used by a process that only prepares requests
SCIPY = ("scipy",)  # never used by a process that runs a LLaVA model with transformers


def leave_out(model: ModelConfig, modules: tuple[str, ...]) -> None:
    """Mark `modules` absent in a process llava-ray owns that never uses them (TORCH: a CPU
    actor, the ingress replica, the CLI's own process: `pipeline.cli`; SCIPY: a model actor or
    replica on transformers: `engines.model_checkpoint`), unless it has imported one of them or
    transformers already. A tiny checkpoint `model` names is built first (with torch).

    transformers imports what it finds installed, used or not: with torch, torch._dynamo and
    torch.distributed.tensor, though the processor's tokenizer, chat template and PIL image
    processor use none of them (~5.4 CPU-s and ~320 MB a process); with scipy, scipy.optimize
    for its object-detection losses as a model loads (0.9-1.5 CPU-s of a model process's start):
    benchmarks/README.md, "Where start-up goes". A module set to None in `sys.modules` is
    Python's own way to make an import fail, and `find_spec` then reports it missing, so
    transformers takes the path without it. Never in a process that may want them later (a
    user's program calling `run_job`)."""
    import logging
    import sys

    resolve_model_name(model.name)
    if any(name in sys.modules for name in (*modules, "transformers")):
        return
    for name in modules:
        sys.modules[name] = None
    if "torch" in modules:  # transformers' notice that models are unavailable: true, and not the user's concern
        logging.getLogger("transformers").addFilter(lambda record: not record.getMessage().startswith("PyTorch was not found"))


def _family(model: ModelConfig, model_type: str) -> FamilySpec:
    if model.family != "auto":
        return family_spec(model.family)
    for spec in FAMILIES.values():
        if model_type in spec.hf_model_types:
            return spec
    known = sorted(t for s in FAMILIES.values() for t in s.hf_model_types)
    raise ConfigError("model.name", f"{model.name!r} is a {model_type!r} checkpoint; llava-ray runs {known}")


def _max_images(family: FamilySpec, config: Any) -> int:
    """From the checkpoint, not the family alone: LLaVA with a SigLIP tower and a Qwen2 text model
    (llava-interleave) was trained on several images per conversation, LLaVA-1.5 on one."""
    known = matching(family.name, config.text_config.model_type, config.vision_config.model_type,
                     config.vision_feature_select_strategy)
    return known.max_images if known and known.max_images else family.max_images_per_prompt


@dataclass(frozen=True)
class Checkpoint:
    name: str  # as configured: labels every output row
    path: str  # what from_pretrained takes: a local folder or a hub id
    revision: str | None
    family: FamilySpec
    config: Any  # transformers' LlavaConfig / LlavaNextConfig
    processor: Any  # the checkpoint's own processor: tokenizer, image processor, chat template
    context_len: int  # the text model's max_position_embeddings
    image_token_id: int
    images: ImageFacts  # what the image processor does: sizes, crop, pinpoints, tokens per image
    max_images: int  # images one prompt may hold: the layout's (llava-interleave: 8), else the family's

    @classmethod
    def load(cls, model: ModelConfig, *, unused: tuple[str, ...] = ()) -> "Checkpoint":
        """Read config.json and the processor files (no weights). A path or id that is not a
        loadable LLaVA checkpoint is a ConfigError naming model.name, before any work starts.
        `unused`: modules this process never uses, left out before transformers is imported
        (`leave_out`)."""
        if unused:
            leave_out(model, unused)
        from transformers import AutoConfig, AutoProcessor

        path = resolve_model_name(model.name)
        try:
            config = AutoConfig.from_pretrained(path, revision=model.revision)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError("model.name", f"{model.name!r} is not a loadable checkpoint: {first_line(e)}") from None
        family = _family(model, config.model_type)
        try:
            processor = AutoProcessor.from_pretrained(path, revision=model.revision)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError("model.name", f"{model.name!r} has no usable processor: {first_line(e)}") from None
        return cls(
            name=model.name,
            path=path,
            revision=model.revision,
            family=family,
            config=config,
            processor=processor,
            context_len=config.text_config.max_position_embeddings,
            image_token_id=config.image_token_index,
            images=ImageFacts.read(processor, family.name, model.name),
            max_images=_max_images(family, config),
        )
