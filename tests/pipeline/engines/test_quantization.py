"""bitsandbytes 4-/8-bit on this CPU, attention and dtype choices, and their config errors."""

import sys

import pytest
import torch

from pipeline.config import load_config
from pipeline.job import run_job
from tests.conftest import (
    ROOT,
    hf_engine,
    preprocessor,
    read_output,
    reference,
    resized,
    write_parquet,
)

sys.path.insert(0, str(ROOT / "benchmarks"))
from memory import build_wide_checkpoint, measure  # noqa: E402

pytest.importorskip("bitsandbytes")
BNB_LINEAR = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_language_model_full_precision_vision_tower(request, family, mode):
    ckpt = request.getfixturevalue(family)
    engine = hf_engine(load_config({"model": {"name": ckpt, "quantization": {"mode": mode}}}))
    kinds = {"language_model": set(), "vision_tower": set(), "multi_modal_projector": set()}
    for name, module in engine.model.named_modules():
        for part in kinds:
            if f".{part}." in f".{name}." and isinstance(module, torch.nn.Linear):
                kinds[part].add(type(module).__name__)
    assert kinds["language_model"] == {BNB_LINEAR[mode]}
    assert kinds["vision_tower"] == {"Linear"} and kinds["multi_modal_projector"] == {"Linear"}
    assert type(engine.model.lm_head).__name__ == "Linear"


def _bnb(mode: str):
    """The model cards' BitsAndBytesConfig, written out here rather than read from our config."""
    from transformers import BitsAndBytesConfig

    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              llm_int8_skip_modules=skip)


@pytest.mark.slow
@pytest.mark.parametrize("family, mode, through", [("tiny_llava", "8bit", "job"), ("tiny_llava_next", "4bit", "job"),
                                                   ("tiny_llava", "4bit", "stages"), ("tiny_llava_next", "8bit", "stages")])
def test_quantized_job_equals_transformers_with_the_same_quantization(ray_local, request, tmp_path, family, mode, through):
    """Each family and each mode once through a whole job; the other two pairs through the job's
    two stages called in this process (the same engine load and generate, without Ray's start-up)."""
    import pyarrow.parquet as pq

    from pipeline.stages import GenerateStage, PreprocessStage

    ckpt = request.getfixturevalue(family)
    images = [resized(n, 240 + 60 * i, 320) for i, n in enumerate(["astronaut", "coffee", "rocket"])]
    prompts = ["Who?", "What is in the cup, and is it hot?", "Describe the launch."]
    rows = [{"id": i, "image": img, "prompt": p} for i, (img, p) in enumerate(zip(images, prompts))]
    rows.append({"id": 9, "image": b"broken", "prompt": None})
    cfg = load_config({
        "model": {"name": ckpt, "quantization": {"mode": mode}}, "generation": {"max_new_tokens": 6},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows)}, "output": {"path": str(tmp_path / "out")},
    })
    label = {"4bit": "transformers/float32/sdpa/bnb-4bit-nf4-bfloat16", "8bit": "transformers/float32/sdpa/bnb-8bit"}[mode]
    if through == "job":
        summary = run_job(cfg)
        out = read_output(cfg.output.path)
        assert (summary.rows_ok, summary.rows_failed, summary.backend) == (3, 1, label)
    else:
        result = GenerateStage(cfg.model_dump())(PreprocessStage(cfg.model_dump())(pq.read_table(cfg.input.path)))
        out = {r["id"]: r for r in result.to_pylist()}
        assert len(out) == 4 and out[9]["error_kind"] == "decode"
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        ref = reference(ckpt, [image], prompt, 6, quantization_config=_bnb(mode))
        row = out[i]
        assert (row["text"], row["prompt_tokens"], row["completion_tokens"], row["error"]) == (
            ref.text, ref.prompt_tokens, ref.completion_tokens, None), i
        assert row["backend"] == label


def test_eager_attention_gives_the_same_answer_as_sdpa(tiny_llava):
    from pipeline.records import Record

    image = resized("chelsea", 300, 451)
    results = {}
    for attn in ("sdpa", "eager"):
        cfg = load_config({"model": {"name": tiny_llava, "attn_implementation": attn}, "generation": {"max_new_tokens": 10}})
        engine = hf_engine(cfg)
        assert engine.backend == f"transformers/float32/{attn}"
        r = engine.generate([preprocessor(cfg).prepare(Record(id=1, images=[image], prompt="Who?"))], cfg.generation)[0]
        results[attn] = (r.text, r.prompt_tokens, r.image_tokens, r.completion_tokens)
    ref = reference(tiny_llava, [image], "Who?", 10)
    assert results["sdpa"] == results["eager"] == (ref.text, ref.prompt_tokens, ref.image_tokens, ref.completion_tokens)


def test_four_bit_lowers_the_kernels_peak_rss_and_the_footprint(tmp_path):
    """Measured in fresh processes on a tiny-but-wider checkpoint (benchmarks/memory.py): peak RSS
    is the kernel's VmHWM, which counts the checkpoint's mapped file pages and the load's
    transients too (measured 0.62 of float32), so the bound is looser than the footprint's."""
    from concurrent.futures import ThreadPoolExecutor

    ckpt = build_wide_checkpoint(tmp_path / "wide")
    with ThreadPoolExecutor(2) as pool:  # side by side: each figure is its own process's
        fp32, four = pool.map(lambda o: measure(ckpt, o), [{"model.dtype": "float32"},
                                                           {"model.dtype": "bfloat16", "model.quantization.mode": "4bit"}])
    assert four["language_model_linear"] == ["Linear4bit"]
    assert four["footprint_bytes"] < 0.2 * fp32["footprint_bytes"]
    assert four["hwm_bytes"] < 0.75 * fp32["hwm_bytes"], (four, fp32)
    assert four["anon_after_bytes"] < 0.5 * fp32["anon_after_bytes"], (four, fp32)


def test_every_4bit_setting_reaches_the_loaded_layers(tiny_llava):
    """fp4, float16 compute, double quantization and a custom skip list (here the language model's
    first layer's MLP kept full too): each is what the loaded Linear4bit layers carry, and the
    row's backend label names them."""
    q = {"mode": "4bit", "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "float16", "bnb_4bit_use_double_quant": True,
         "skip_modules": ["model.vision_tower", "model.multi_modal_projector", "lm_head", "model.language_model.layers.0.mlp"]}
    engine = hf_engine(load_config({"model": {"name": tiny_llava, "quantization": q}}))
    quantized = {name: m for name, m in engine.model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert quantized and not [n for n in quantized if n.startswith(("model.vision_tower", "model.multi_modal_projector",
                                                                     "model.language_model.layers.0.mlp"))]
    assert type(engine.model.get_submodule("model.language_model.layers.0.mlp.up_proj")).__name__ == "Linear"
    for module in quantized.values():
        assert (module.weight.quant_type, module.compute_dtype, module.weight.compress_statistics) == ("fp4", torch.float16, True)
    assert engine.backend == "transformers/float32/sdpa/bnb-4bit-fp4-float16"


@pytest.mark.parametrize("dtype, device, resolved", [("bfloat16", "cpu", "bfloat16"), ("float16", "cpu", "float16"),
                                                     ("auto", "cpu", "float32"), ("auto", "cuda", "bfloat16")])
def test_model_dtype_resolves_as_documented(dtype, device, resolved):
    from pipeline.engines.base import resolve_dtype

    assert resolve_dtype(load_config({"model": {"name": "m", "dtype": dtype}}), device) == resolved


def test_a_bfloat16_model_loads_and_answers_in_bfloat16(tiny_llava):
    """model.dtype: bfloat16 without quantization: the weights are bfloat16, the backend label says
    so, and the answer is the model's own bfloat16 generation (transformers' loop, same dtype)."""
    from pipeline.records import Record

    cfg = load_config({"model": {"name": tiny_llava, "dtype": "bfloat16"}, "generation": {"max_new_tokens": 6}})
    engine = hf_engine(cfg)
    assert engine.backend == "transformers/bfloat16/sdpa"
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    image = resized("astronaut", 240, 320)
    [result] = engine.generate([preprocessor(cfg).prepare(Record(id=1, images=[image], prompt="Who?"))], cfg.generation)
    ref = reference(tiny_llava, [image], "Who?", 6, dtype=torch.bfloat16)
    assert (result.text, result.completion_tokens) == (ref.text, ref.completion_tokens)
