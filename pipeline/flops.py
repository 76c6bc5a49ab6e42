"""A LLaVA checkpoint's model FLOPs, from its config.json: what `llava-ray plan` prices.

Matrix multiplies only (2 FLOPs per multiply-add; norms, activations, softmax and embedding
look-ups are left out, as in the usual 2N-per-token count), dense, and for every generated row
`max_new_tokens` tokens (an upper bound: a row that stops early costs less). README, "Plan a job
before running it", gives the formula; tests/pipeline/test_plan.py checks it by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def _layers_run(feature_layer: int | list[int], layers: int) -> int:
    """Vision layers the model needs: up to the deepest feature layer it reads (hidden state
    -2 of 24 layers is layer 23's output). vLLM stops there; transformers runs the rest and
    drops it."""
    read = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    return max(n if n >= 0 else layers + 1 + n for n in read)


@dataclass(frozen=True)
class ModelFlops:
    """The sizes a LLaVA checkpoint's FLOPs depend on, and the FLOPs of each part."""

    patches: int  # per tile: (image_size / patch_size)^2
    patch_pixels: int  # 3 * patch_size^2
    vision_tokens: int  # per tile through the tower: the patches, + CLS for CLIP
    vision_layers: int
    vision_width: int
    vision_mlp: int
    features: int  # per tile into the projector: the tower's tokens, less the first with 'default'
    projector_in: int  # vision width x the feature layers read
    text_layers: int
    text_width: int
    text_mlp: int  # gated (SwiGLU): three width x mlp matrices per layer
    q_width: int  # heads x head_dim
    kv_width: int  # key/value heads x head_dim
    vocab: int

    @classmethod
    def read(cls, config: Any) -> "ModelFlops":
        """From transformers' LlavaConfig / LlavaNextConfig (Checkpoint.config)."""
        v, t = config.vision_config, config.text_config
        patches = (v.image_size // v.patch_size) ** 2
        tokens = patches + (v.model_type == "clip_vision_model")  # CLIP's CLS; SigLIP has none
        layer = config.vision_feature_layer
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return cls(
            patches=patches,
            patch_pixels=3 * v.patch_size**2,
            vision_tokens=tokens,
            vision_layers=_layers_run(layer, v.num_hidden_layers),
            vision_width=v.hidden_size,
            vision_mlp=v.intermediate_size,
            features=tokens - (config.vision_feature_select_strategy == "default"),  # 'default' drops the first
            projector_in=v.hidden_size * (len(layer) if isinstance(layer, list) else 1),
            text_layers=t.num_hidden_layers,
            text_width=t.hidden_size,
            text_mlp=t.intermediate_size,
            q_width=t.num_attention_heads * head_dim,
            kv_width=t.num_key_value_heads * head_dim,
            vocab=t.vocab_size,
        )

    @property
    def vision_per_tile(self) -> int:
        """Patch embedding, then per layer: q, k, v, o (4 d^2 per token), the MLP (2 d f per
        token), and attention's scores and weighted values (2 T^2 d)."""
        d, f, n = self.vision_width, self.vision_mlp, self.vision_tokens
        layer = 2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * n * n * d
        return 2 * self.patches * self.patch_pixels * d + self.vision_layers * layer

    @property
    def projector_per_tile(self) -> int:
        """Two linear layers, vision width -> text width -> text width, per feature."""
        d = self.text_width
        return 2 * self.features * (self.projector_in * d + d * d)

    @property
    def text_per_token(self) -> int:
        """A token through the text model's linear layers: q, k, v, o and the gated MLP."""
        d = self.text_width
        return 2 * self.text_layers * (d * (self.q_width + 2 * self.kv_width) + self.q_width * d + 3 * d * self.text_mlp)

    def prefill(self, prompt_tokens: np.ndarray) -> np.ndarray:
        """P prompt tokens, causal attention (token i attends to i tokens: 4 L q i), and the
        logits of the first generated token."""
        p = prompt_tokens.astype(np.float64)
        return p * self.text_per_token + 2 * self.text_layers * self.q_width * p * (p + 1) + 2 * self.text_width * self.vocab

    def decode(self, prompt_tokens: np.ndarray, new_tokens: int) -> np.ndarray:
        """The other G - 1 tokens one at a time, token j attending to P + j, each with its logits."""
        p, g = prompt_tokens.astype(np.float64), new_tokens - 1
        attention = 4 * self.text_layers * self.q_width * (g * p + g * (g + 1) / 2)
        return g * (self.text_per_token + 2 * self.text_width * self.vocab) + attention
