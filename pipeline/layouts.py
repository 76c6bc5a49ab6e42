"""The checkpoint layouts llava-ray runs, as data: what each llava-hf checkpoint's files say.

A layout is the shape of a real checkpoint -- its text and vision configs, its image processor,
its special tokens and its chat template (llava-hf's `chat_template.json`, verbatim) -- without
its weights. `pipeline/tiny.py` builds each one tiny (the same config classes, processor class,
tokens and template; small widths, random weights), so every layout is tested through the real
`from_pretrained` path; `benchmarks/gpu.py` writes the full-size configs. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Every llava-hf LLaVA-NeXT checkpoint uses these (config.json and preprocessor_config.json).
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
IMAGE_TOKEN = "<image>"

CLIP_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                layer_norm_eps=1e-5)
SIGLIP_384 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                  num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                  layer_norm_eps=1e-6, vision_use_head=False)

_CLIP_PROCESSOR = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_convert_rgb=True)
CLIP_PROCESSOR = ("CLIPImageProcessor", _CLIP_PROCESSOR)
SIGLIP_PROCESSOR = ("SiglipImageProcessor", dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                                                 image_std=[0.5] * 3, resample=3))
NEXT_PROCESSOR = ("LlavaNextImageProcessor", dict(_CLIP_PROCESSOR, image_grid_pinpoints=NEXT_PINPOINTS, do_pad=True))

# llava-hf's chat_template.json of each checkpoint, verbatim.
_VICUNA = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
_INTERLEAVE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_YI_34B = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA3 = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_QWEN_72B = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Tokens:
    """A checkpoint's special tokens: what the chat template and generation stop on."""

    eos: str
    pad: str
    bos: str | None = None  # prepended by the tokenizer when add_bos
    unk: str | None = None
    extra: tuple[str, ...] = ()  # the template's own markers (<|im_start|>, <|eot_id|>, ...)
    add_bos: bool = True


LLAMA_TOKENS = Tokens(bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
QWEN_TOKENS = Tokens(eos="<|im_end|>", pad="<|endoftext|>", extra=("<|endoftext|>", "<|im_start|>"), add_bos=False)


@dataclass(frozen=True)
class Layout:
    hub_id: str
    family: str  # pipeline.families: llava | llava_next
    text: dict[str, Any]  # the real text config (model_type + sizes)
    vision: dict[str, Any]  # the real vision config
    image_processor: tuple[str, dict[str, Any]]  # class (PIL twin: + "Pil") and its settings
    chat_template: str
    tokens: Tokens
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int = -2
    num_additional_image_tokens: int = 1  # CLIP's CLS; SigLIP has none
    max_images: int | None = None  # images one prompt may hold; None: the family's (pipeline/families.py)
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level config keys

    @property
    def short_name(self) -> str:
        return self.hub_id.split("/", 1)[1].removesuffix("-hf")


_LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
                 rms_norm_eps=1e-5)

LAYOUTS: dict[str, Layout] = {layout.hub_id: layout for layout in [
    Layout("llava-hf/llava-1.5-7b-hf", "llava", _LLAMA_7B, CLIP_336, CLIP_PROCESSOR, _VICUNA, LLAMA_TOKENS),
    Layout(
        "llava-hf/llava-interleave-qwen-0.5b-hf", "llava",
        dict(model_type="qwen2", hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
             use_sliding_window=False),
        SIGLIP_384, SIGLIP_PROCESSOR, _INTERLEAVE, QWEN_TOKENS,
        vision_feature_select_strategy="full", vision_feature_layer=-1, num_additional_image_tokens=0,
        max_images=8,  # trained on interleaved multi-image conversations (LLaVA-1.5 on one image)
    ),
    Layout(
        "llava-hf/llava-v1.6-mistral-7b-hf", "llava_next",
        dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5),
        CLIP_336, NEXT_PROCESSOR, _MISTRAL, LLAMA_TOKENS,
    ),
    Layout("llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next", _LLAMA_7B, CLIP_336, NEXT_PROCESSOR, _VICUNA,
           Tokens(bos="<s>", eos="</s>", unk="<unk>", pad="<unk>")),
    Layout(
        "llava-hf/llava-v1.6-34b-hf", "llava_next",
        dict(model_type="llama", hidden_size=7168, intermediate_size=20480, num_hidden_layers=60, num_attention_heads=56,
             num_key_value_heads=8, max_position_embeddings=4096, rope_theta=5e6, rms_norm_eps=1e-5),
        CLIP_336, NEXT_PROCESSOR, _YI_34B,
        Tokens(bos="<|startoftext|>", eos="<|im_end|>", unk="<unk>", pad="<unk>", extra=("<|endoftext|>", "<|im_start|>"),
               add_bos=False),
    ),
    Layout(
        "llava-hf/llama3-llava-next-8b-hf", "llava_next",
        dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=8192, rope_theta=5e5, rms_norm_eps=1e-5),
        CLIP_336, NEXT_PROCESSOR, _LLAMA3,
        Tokens(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<pad>",
               extra=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>")),
    ),
    Layout(
        "llava-hf/llava-next-72b-hf", "llava_next",
        dict(model_type="qwen2", hidden_size=8192, intermediate_size=24576, num_hidden_layers=80, num_attention_heads=64,
             num_key_value_heads=64, max_position_embeddings=32768, rope_theta=1e6, use_sliding_window=False),
        CLIP_336, NEXT_PROCESSOR, _QWEN_72B, QWEN_TOKENS,
    ),
]}

DEFAULT_LAYOUTS = {"llava": "llava-hf/llava-1.5-7b-hf", "llava_next": "llava-hf/llava-v1.6-mistral-7b-hf"}

# Short names usable as `model.name`: every layout's, and llava-hf checkpoints of a listed layout's
# structure at another size (so a new Layout is a preset without a second list to keep).
PRESETS: dict[str, str] = {item.short_name: item.hub_id for item in LAYOUTS.values()} | {
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-v1.6-vicuna-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
    "llava-interleave-qwen-7b": "llava-hf/llava-interleave-qwen-7b-hf",
}


def matching(family: str, text_type: str, vision_type: str, strategy: str) -> Layout | None:
    """The layout a checkpoint has by its structure (config.json), or None for one not listed."""
    for item in LAYOUTS.values():
        if (item.family, item.text["model_type"], item.vision["model_type"], item.vision_feature_select_strategy) == (
                family, text_type, vision_type, strategy):
            return item
    return None


def layout(name: str) -> Layout:
    """A layout by hub id, short name (llava-1.5-7b) or family (llava, llava_next: its default)."""
    key = DEFAULT_LAYOUTS.get(name.replace("-", "_"), name)
    for item in LAYOUTS.values():
        if key in (item.hub_id, item.short_name):
            return item
    raise KeyError(f"unknown layout {name!r}; known: {sorted(l.short_name for l in LAYOUTS.values())}")
