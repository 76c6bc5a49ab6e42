"""The vLLM backend on a GPU: agreement with transformers on the tiny checkpoints, the offline
job with `backend: vllm`, and the Serve app streaming from vLLM's async engine.

Run on a GPU machine: `make test-gpu` (or `python -m pytest -q -s -m gpu` where vLLM is installed).
Agreement rule (random weights make near-ties possible): in float32 on both sides, the first
generated token is equal on every row and the whole greedy text on at least 90% of rows; the
measured agreement is printed (`-s`) and recorded as a test property.
"""

from __future__ import annotations

import json
import socket

import httpx
import pyarrow as pa
import pytest

from pipeline.config import load_config
from tests.conftest import (
    encode,
    hf_engine,
    photo,
    preprocessor,
    read_output,
    resized,
    write_parquet,
)

# The `gpu` tests run by `make test-gpu`, skipped (saying why) where CUDA or vLLM is missing; the
# others check, without vLLM, what the engine hands it.
gpu = pytest.mark.gpu

MAX_NEW = 24
# Each vLLM engine here takes a fifth of the GPU, so engines that outlive their test still fit.
VLLM = {"enforce_eager": True, "gpu_memory_utilization": 0.2, "max_model_len": 4096}
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "retina"]
SHAPES = [(1024, 768), (768, 1024), (2000, 1500), (300, 900), (480, 640), (900, 300), (1200, 1201), (336, 336)]
PROMPTS = ["Describe this image.", "What is shown here?", "What colours do you see?", "Is there a person?"]


@pytest.mark.parametrize("dtype", ["auto", "float16", "bfloat16", "float32"])
def test_the_configured_dtype_reaches_vllm_as_is(tiny_llava, dtype):
    """`auto` is vLLM's own choice (the checkpoint's dtype, float16 for llava-1.5-hf, and what the
    GPU supports: no bfloat16 on a T4 or V100), never replaced by bfloat16 here."""
    import torch

    from pipeline.checkpoint import Checkpoint
    from pipeline.engines.vllm_engine import dtype_label, engine_args

    cfg = load_config({"model": {"name": tiny_llava, "dtype": dtype}, "backend": "vllm"})
    assert engine_args(cfg, Checkpoint.load(cfg.model))["dtype"] == dtype
    assert dtype_label(torch.float16) == "vllm/float16"  # the label is the dtype vLLM resolved


def _rows(n: int) -> list[tuple[str, bytes, str]]:
    """n (id, JPEG bytes, prompt): real photos at many sizes and aspect ratios."""
    return [
        (f"r{i}", resized(PHOTOS[i % len(PHOTOS)], *SHAPES[(i // len(PHOTOS) + i) % len(SHAPES)]), PROMPTS[i % len(PROMPTS)])
        for i in range(n)
    ]


def _cfg(ckpt: str, backend: str, max_new: int, **extra):
    data = {
        "model": {"name": ckpt, "dtype": "float32", "device": "cuda"},
        "backend": backend,
        "generation": {"max_new_tokens": max_new},
        "limits": {"max_images_per_row": 1},
        "resources": {"num_gpus_per_actor": 1},
        "vllm": VLLM | {"limit_mm_per_prompt": 1},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return load_config(data)


def _generate(cfg, rows, engine):
    from pipeline.records import Record

    pre = preprocessor(cfg)
    requests = [pre.prepare(Record(id=i, images=[img], prompt=p)) for i, img, p in rows]
    if cfg.backend == "vllm":  # the CPU stage hands vLLM the prompt and working-size images
        assert all(r.images and r.tiles is None for r in requests)
    full = engine.generate(requests, cfg.generation)
    first = engine.generate(requests, cfg.generation.model_copy(update={"max_new_tokens": 1}))
    return full, first


@gpu
@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_vllm_greedy_output_agrees_with_transformers(request, record_property, family):
    from pipeline.checkpoint import Checkpoint
    from pipeline.engines.vllm_engine import VLLMEngine

    ckpt = request.getfixturevalue(family)
    rows = _rows(40)
    hf_cfg, vllm_cfg = _cfg(ckpt, "transformers", MAX_NEW), _cfg(ckpt, "vllm", MAX_NEW)
    hf_full, hf_first = _generate(hf_cfg, rows, hf_engine(hf_cfg))
    engine = VLLMEngine(vllm_cfg, Checkpoint.load(vllm_cfg.model))
    try:
        v_full, v_first = _generate(vllm_cfg, rows, engine)
    finally:
        engine.close()
    assert engine.backend == "vllm/float32"

    for h, v in zip(hf_full, v_full):
        assert h.error is None and v.error is None, (h.error, v.error)
        # vLLM's own token count of the prompt equals the CPU stage's: the context check is exact.
        assert (v.prompt_tokens, v.image_tokens) == (h.prompt_tokens, h.image_tokens), h.id
    first_equal = sum((h.text, h.finish_reason) == (v.text, v.finish_reason) for h, v in zip(hf_first, v_first))
    text_equal = sum((h.text, h.finish_reason, h.completion_tokens) == (v.text, v.finish_reason, v.completion_tokens) for h, v in zip(hf_full, v_full))
    record_property("first_token_equal", f"{first_equal}/{len(rows)}")
    record_property("text_equal", f"{text_equal}/{len(rows)}")
    print(f"\n[agreement] {family} float32, {len(rows)} rows, {MAX_NEW} tokens: "
          f"first token equal {first_equal}/{len(rows)}, full text equal {text_equal}/{len(rows)}")
    assert first_equal == len(rows)
    assert text_equal >= 0.9 * len(rows)


@gpu
def test_offline_job_with_vllm_writes_every_row_once(ray_local, tiny_llava_next, tmp_path):
    from pipeline.job import run_job

    good = {k: ([img], p) for k, img, p in _rows(10)}
    good["pair"] = ([resized("chelsea", 240, 320), resized("coffee", 200, 300)], "Compare the two images.")
    bad = {
        "corrupt": [encode(photo("coffee"), "JPEG")[:300]],
        "empty": [b""],
        "text": [b"just some text, not an image"],
        "long": [resized("coffee", 64, 64)],
    }
    rows = [{"id": k, "image": imgs, "prompt": p} for k, (imgs, p) in good.items()]
    rows += [{"id": k, "image": imgs, "prompt": "coffee " * 3600 if k == "long" else None} for k, imgs in bad.items()]
    schema = pa.schema([("id", pa.string()), ("image", pa.list_(pa.binary())), ("prompt", pa.string())])
    cfg = load_config(
        {
            "model": {"name": tiny_llava_next},
            "backend": "vllm",
            "generation": {"max_new_tokens": 12},
            "input": {"path": write_parquet(tmp_path / "in.parquet", rows, schema)},
            "output": {"path": str(tmp_path / "out")},
            "resources": {"model_batch_size": 4, "preprocess_batch_size": 4, "rows_per_block": 4, "num_gpus_per_actor": 1},
            "limits": {"max_images_per_row": 2},
            "vllm": VLLM | {"limit_mm_per_prompt": 2, "batches_in_flight": 2},
        }
    )
    summary = run_job(cfg)
    out = read_output(cfg.output.path)

    assert set(out) == set(good) | set(bad)  # every input row exactly once
    assert (summary.rows_ok, summary.rows_failed) == (len(good), len(bad))
    for k in good:
        assert out[k]["error"] is None and out[k]["text"] is not None, (k, out[k]["error"])
        # dtype auto: vLLM chooses from the checkpoint (float32 here) and the GPU, a 16-bit type
        assert out[k]["completion_tokens"] > 0 and out[k]["backend"] in ("vllm/float16", "vllm/bfloat16")
    processor = preprocessor(cfg).processor  # both images go at their own size: counts add up
    assert out["pair"]["image_tokens"] == sum(processor._get_num_multimodal_tokens(image_sizes=[(240, 320), (200, 300)]).num_image_tokens)
    assert out["corrupt"]["error"].startswith("image: truncated or corrupt")
    assert out["empty"]["error"] == "image: empty (0 bytes)"
    assert out["text"]["error"] == "image: cannot identify image file"
    assert "exceeds the model's context" in out["long"]["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@gpu
def test_serve_app_streams_from_vllm(ray_local, tiny_llava):
    import base64

    from ray import serve

    from deployments.app import serve_local

    cfg = load_config(
        "configs/serve-tiny.yaml",
        overrides={
            "model.name": tiny_llava,
            "model.device": "auto",
            "backend": "vllm",
            "generation.max_new_tokens": MAX_NEW,
            "resources.num_gpus_per_actor": 1,
            "limits.max_images_per_row": 1,
            "serve.port": _free_port(),
            "serve.served_model_name": "tiny",
            "serve.api_key": "k",
            **{f"vllm.{k}": v for k, v in VLLM.items()},
        },
    )
    url = serve_local(cfg, blocking=False)
    try:
        image = base64.b64encode(resized("astronaut", 1024, 768)).decode()
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}},
                {"type": "text", "text": "What is the person wearing?"},
            ]}],
            "max_tokens": MAX_NEW,
            "temperature": 0,
        }
        headers = {"Authorization": "Bearer k"}
        whole = httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=120).json()
        with httpx.stream("POST", f"{url}/chat/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}},
                          headers=headers, timeout=120) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    finally:
        serve.shutdown()

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    assert sum(1 for p in pieces if p) >= 2  # text arrives in pieces, as vLLM produces it
    assert "".join(p or "" for p in pieces) == whole["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert finish == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"] == whole["usage"]
