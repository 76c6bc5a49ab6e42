"""Build tiny, randomly initialised LLaVA / LLaVA-NeXT checkpoints with the real structure.

Model weights cannot be downloaded here, so tests, the demo and the benchmarks use checkpoints
built by this module and saved with `save_pretrained`: everything else loads them through the
same `from_pretrained` path as `llava-hf/llava-1.5-7b-hf`. The structure is the real one
(CLIP vision tower at 336 px with patch 14 -> 576 features per tile, a Llama text model, the
`<image>` token, the real chat template, AnyRes pinpoints for NeXT); only the widths are small.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .families import family_spec

logger = logging.getLogger(__name__)

IMAGE_SIZE = 336
PATCH_SIZE = 14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"

# The chat templates shipped by llava-hf/llava-1.5-7b-hf and llava-hf/llava-v1.6-mistral-7b-hf.
CHAT_TEMPLATES = {
    "llava": (
        "{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ message['role'].upper() + ': '}}{% endif %}"
        "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}"
        "{# Render all text next #}{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% else %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "llava_next": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
        "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}"
        "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
}

# A small English corpus for the BPE merges: enough that prompts tokenise into words, not bytes.
_CORPUS = """
USER ASSISTANT SYSTEM [INST] [/INST] describe this image in one sentence what is shown in the picture
a photo of a cat dog person astronaut rocket coffee cup page of text sitting on a table outside
the quick brown fox jumps over the lazy dog how many people are there what color is the sky
answer the question briefly caption write a short description of the scene objects animals
"""


def train_tokenizer(vocab_size: int):
    """A BPE tokenizer trained here, wrapped as a fast HF tokenizer (Llama-style BOS).

    No byte fallback alphabet: every token decodes to corpus text, so random generations read as
    words (and stream cleanly) instead of broken UTF-8; unseen characters map to <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the image token is added after training
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def llava_config(spec, tokenizer, text_config, vision_config):
    """The LlavaConfig / LlavaNextConfig around a text and a vision config, wired as llava-hf's."""
    import transformers as tf

    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    if spec.name == "llava_next":
        return tf.LlavaNextConfig(**common, image_grid_pinpoints=NEXT_PINPOINTS)
    return tf.LlavaConfig(**common)


def llava_processor(spec, tokenizer):
    """The checkpoint's processor: CLIP 336 image processing (AnyRes for NeXT), the real chat template."""
    import transformers as tf

    image_processor_kwargs = dict(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor_kwargs = dict(
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the 'default' strategy
        chat_template=CHAT_TEMPLATES[spec.name],
    )
    if spec.name == "llava_next":
        image_processor = tf.LlavaNextImageProcessorPil(**image_processor_kwargs, image_grid_pinpoints=NEXT_PINPOINTS)
        return tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **processor_kwargs)
    image_processor = tf.CLIPImageProcessorPil(**image_processor_kwargs)
    return tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, **processor_kwargs)


def build_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "llava",
    *,
    text_hidden: int = 64,
    vision_hidden: int = 64,
    layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    save_dtype: str = "float32",
    attention_gain: float = 15.0,
    value_gain: float = 5.0,
) -> Path:
    """Write a tiny random checkpoint of `family` ('llava' or 'llava_next') to `out_dir`.

    Widths default to 64 so every linear layer's input size is a multiple of 64, which
    bitsandbytes' CPU kernels need for 4-/8-bit loading. `save_dtype` bfloat16 stores weights
    the way real LLaVA checkpoints are stored (half precision).

    Freshly initialised attention is nearly uniform, so a prompt's few tokens drown among the
    576+ image positions and every prompt gets the same answer: a test could not see a dropped
    prompt. `attention_gain` scales the language model's q/k projections (sharper, content-
    dependent attention) and `value_gain` its v/o projections (attention output comparable to
    the residual stream), so answers depend on the prompt and on the image (tests/pipeline/
    test_tiny.py pins that). 1.0 and 1.0 give the plain random initialisation.
    """
    import torch
    import transformers as tf

    spec = family_spec(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = train_tokenizer(vocab_size)
    heads = max(1, text_hidden // 32)
    text_config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = tf.CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, vision_hidden // 32),
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_hidden,
    )
    config = llava_config(spec, tokenizer, text_config, vision_config)
    processor = llava_processor(spec, tokenizer)
    model = getattr(tf, spec.model_class)(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn = layer.self_attn
            for proj, gain in ((attn.q_proj, attention_gain), (attn.k_proj, attention_gain), (attn.v_proj, value_gain), (attn.o_proj, value_gain)):
                proj.weight.mul_(gain)
    model.generation_config = tf.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.to(getattr(torch, save_dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    meta = {"family": spec.name, "text_hidden": text_hidden, "seed": seed, "version": TINY_VERSION,
            "attention_gain": attention_gain, "value_gain": value_gain}
    (out / "tiny.json").write_text(json.dumps(meta))
    logger.info("wrote tiny %s checkpoint to %s", spec.name, out)
    return out


# `model.name: tiny-llava` (or tiny-llava-next) in a config: built once into the cache, so the
# demo and the tiny serve config work from a fresh clone without a separate build step.
TINY_NAMES = {"tiny-llava": "llava", "tiny-llava-next": "llava_next"}
TINY_VERSION = 2  # bumped when the builder changes what it writes: cached copies are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_RAY_CACHE", Path.home() / ".cache" / "llava-ray"))


def ensure_tiny(name: str) -> Path:
    """Path of the cached tiny checkpoint `name`, building it first if needed (atomic rename,
    so concurrent actors never see a half-written checkpoint)."""
    target = cache_dir() / name
    meta = target / "tiny.json"
    if meta.is_file() and json.loads(meta.read_text()).get("version") == TINY_VERSION:
        return target
    if target.exists():  # built by an older builder
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    build_tiny_checkpoint(tmp, TINY_NAMES[name])
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its checkpoint is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return target
