"""Build tiny, randomly initialised checkpoints of every layout llava-ray runs (pipeline/layouts.py).

Model weights cannot be downloaded here, so tests, the demo and the benchmarks use checkpoints
built by this module and saved with `save_pretrained`: everything else loads them through the
same `from_pretrained` path as `llava-hf/llava-1.5-7b-hf`. Each has its layout's real structure --
the config classes (Llama / Mistral / Qwen2 text, CLIP / SigLIP vision), the image processor class
and settings, the special tokens and the chat template -- with small widths and a BPE tokenizer
trained here standing in for the real vocabulary.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .families import family_spec
from .layouts import IMAGE_TOKEN, LAYOUTS, Layout, layout as find_layout

logger = logging.getLogger(__name__)

# A small English corpus for the BPE merges: enough that prompts tokenise into words, not bytes.
_CORPUS = """
USER ASSISTANT SYSTEM [INST] [/INST] describe this image in one sentence what is shown in the picture
a photo of a cat dog person astronaut rocket coffee cup page of text sitting on a table outside
the quick brown fox jumps over the lazy dog how many people are there what color is the sky
answer the question briefly caption write a short description of the scene objects animals
user assistant system <<SYS>> <</SYS>> ? . , ! : ' " 0 1 2 3 4 5 6 7 8 9
"""


def train_tokenizer(vocab_size: int, spec: Layout | None = None):
    """A BPE tokenizer trained here, wrapped as a fast HF tokenizer with the layout's special
    tokens (BOS prepended when the real tokenizer does), plus the image token.

    No byte fallback alphabet: every token decodes to corpus text, so random generations read as
    words (and stream cleanly) instead of broken UTF-8; unseen characters map to <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = (spec or find_layout("llava")).tokens
    specials = list(dict.fromkeys(s for s in ("<unk>", t.bos, t.eos, t.pad, *t.extra) if s))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the image token is added after training
        special_tokens=specials,
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    if t.add_bos and t.bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{t.bos} $A", special_tokens=[(t.bos, tok.token_to_id(t.bos))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=t.bos,
        eos_token=t.eos,
        unk_token=t.unk,
        pad_token=t.pad,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.add_special_tokens({"additional_special_tokens": [*t.extra, IMAGE_TOKEN]})
    return fast


def _small(real: dict, hidden: int, layers: int, **more) -> dict:
    """The real config's keys with small widths; grouped-query attention stays grouped."""
    heads = max(1, hidden // 32)
    grouped = real.get("num_key_value_heads", real["num_attention_heads"]) < real["num_attention_heads"]
    small = dict(real, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=heads, **more)
    if "num_key_value_heads" in real:
        small["num_key_value_heads"] = 1 if grouped else heads
    if "projection_dim" in real:
        small["projection_dim"] = hidden
    return small


def llava_config(spec: Layout, tokenizer, text_config: dict, vision_config: dict):
    """The LlavaConfig / LlavaNextConfig around a text and a vision config, wired as llava-hf's."""
    import transformers as tf

    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        vision_feature_layer=spec.vision_feature_layer,
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
        **spec.extra,
    )
    if spec.family == "llava_next":
        return tf.LlavaNextConfig(**common, image_grid_pinpoints=spec.image_processor[1]["image_grid_pinpoints"])
    return tf.LlavaConfig(**common)


def llava_processor(spec: Layout, tokenizer):
    """The checkpoint's processor: its image processor class and settings (the PIL backend; it
    saves under the real class name, which loads the torchvision twin where torchvision is
    installed), patch size, feature strategy and chat template."""
    import transformers as tf

    name, settings = spec.image_processor
    image_processor = getattr(tf, f"{name}Pil")(**settings)
    processor_cls = tf.LlavaNextProcessor if spec.family == "llava_next" else tf.LlavaProcessor
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.vision["patch_size"],
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        num_additional_image_tokens=spec.num_additional_image_tokens,
        chat_template=spec.chat_template,
    )


def build_tiny_checkpoint(
    out_dir: str | Path,
    layout: str = "llava",
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
    """Write a tiny random checkpoint of `layout` (a hub id or short name from pipeline/layouts.py,
    or a family: 'llava' = llava-1.5-7b, 'llava_next' = llava-v1.6-mistral-7b) to `out_dir`.

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

    spec = find_layout(layout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = train_tokenizer(vocab_size, spec)
    ids = {k: tokenizer.convert_tokens_to_ids(v) if v else None for k, v in
           (("bos_token_id", spec.tokens.bos), ("eos_token_id", spec.tokens.eos), ("pad_token_id", spec.tokens.pad))}
    text_config = _small(spec.text, text_hidden, layers, vocab_size=len(tokenizer), **ids)
    vision_config = _small(spec.vision, vision_hidden, layers)
    config = llava_config(spec, tokenizer, text_config, vision_config)
    processor = llava_processor(spec, tokenizer)
    model = getattr(tf, family_spec(spec.family).model_class)(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attn = layer.self_attn
            for proj, gain in ((attn.q_proj, attention_gain), (attn.k_proj, attention_gain), (attn.v_proj, value_gain), (attn.o_proj, value_gain)):
                proj.weight.mul_(gain)
    model.generation_config = tf.GenerationConfig(**ids, do_sample=False)
    model.to(getattr(torch, save_dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    meta = {"layout": spec.hub_id, "family": spec.family, "text_hidden": text_hidden, "seed": seed, "version": TINY_VERSION,
            "attention_gain": attention_gain, "value_gain": value_gain}
    (out / "tiny.json").write_text(json.dumps(meta))
    logger.info("wrote tiny %s checkpoint to %s", spec.hub_id, out)
    return out


# `model.name: tiny-llava` (or tiny-llava-next, or tiny-<layout>, e.g. tiny-llava-interleave-qwen-0.5b)
# in a config: built once into the cache, so the demo and the tiny serve config work from a fresh
# clone without a separate build step.
TINY_NAMES = {"tiny-llava": "llava", "tiny-llava-next": "llava_next",
              **{f"tiny-{spec.short_name}": spec.hub_id for spec in LAYOUTS.values()}}
TINY_VERSION = 3  # bumped when the builder changes what it writes: cached copies are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_RAY_CACHE", Path.home() / ".cache" / "llava-ray"))


def ensure_tiny(name: str) -> Path:
    """Path of the cached tiny checkpoint `name`, building it first if needed. Under a file lock,
    so actors starting together build it once; into a temporary folder renamed into place, so a
    build killed halfway never leaves a half-written checkpoint under its name."""
    target = cache_dir() / name
    meta = target / "tiny.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if meta.is_file() and json.loads(meta.read_text()).get("version") == TINY_VERSION:
            return target
        if target.exists():  # built by an older builder
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        build_tiny_checkpoint(tmp, TINY_NAMES[name])
        tmp.rename(target)
    return target
