"""The offline job end to end on local Ray: parity with transformers, exactly-once, bad rows."""

import json

import pyarrow as pa
import pytest
from conftest import encode, photo, read_output, reference_text, resized, write_parquet

from pipeline.config import load_config
from pipeline.errors import JobError
from pipeline.job import run_job

pytestmark = pytest.mark.slow
MAX_NEW = 12


def _job(ckpt, tmp_path, rows, schema=None, **extra):
    cfg = {
        "model": {"name": ckpt},
        "generation": {"max_new_tokens": MAX_NEW},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows, schema)},
        "output": {"path": str(tmp_path / "out")},
        "resources": {"model_batch_size": 4, "preprocess_batch_size": 4, "rows_per_block": 4},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return load_config(cfg)


def test_llava_job_matches_transformers_and_accounts_for_every_row(ray_local, tiny_llava, tmp_path):
    good = {
        "astronaut": (encode(photo("astronaut")), "What is the person wearing?"),
        "chelsea": (resized("chelsea", 300, 451), None),
        "coffee": (resized("coffee", 400, 600, "PNG"), "What drink is this?"),
        "rocket": (resized("rocket", 427, 640), "Describe it."),
    }
    path_img = tmp_path / "camera.png"
    path_img.write_bytes(encode(photo("camera")))
    rows = [{"id": k, "image": img, "image_path": None, "prompt": p, "messages": None, "tag": f"t-{k}"} for k, (img, p) in good.items()]
    rows += [
        {"id": "from-path", "image": None, "image_path": str(path_img), "prompt": "What is this?", "messages": None, "tag": "p"},
        {"id": "chat", "image": encode(photo("astronaut")), "image_path": None, "prompt": None, "tag": "c",
         "messages": json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]}])},
        {"id": "corrupt", "image": encode(photo("coffee"), "JPEG")[:300], "image_path": None, "prompt": None, "messages": None, "tag": "x"},
        {"id": "empty", "image": b"", "image_path": None, "prompt": None, "messages": None, "tag": "x"},
        {"id": "text", "image": b"just some text, not an image", "image_path": None, "prompt": None, "messages": None, "tag": "x"},
        {"id": "missing", "image": None, "image_path": str(tmp_path / "nope.jpg"), "prompt": None, "messages": None, "tag": "x"},
        {"id": "huge", "image": encode(photo("hubble_deep_field")), "image_path": None, "prompt": None, "messages": None, "tag": "x"},
        {"id": "long", "image": resized("coffee", 64, 64), "image_path": None, "prompt": "coffee " * 3600, "messages": None, "tag": "x"},
        {"id": "badchat", "image": resized("coffee", 64, 64), "image_path": None, "prompt": None, "messages": "{not json", "tag": "x"},
    ]
    cfg = _job(tiny_llava, tmp_path, rows, input={"passthrough": ["tag"]}, limits={"max_pixels": 800_000})
    summary = run_job(cfg)
    out = read_output(cfg.output.path)

    assert set(out) == {r["id"] for r in rows}  # every input row exactly once
    assert (summary.rows_total, summary.rows_ok, summary.rows_failed, summary.rows_processed) == (len(rows), 6, 7, len(rows))
    default_prompt = cfg.prompt.default
    for key, (img, prompt) in good.items():
        assert out[key]["error"] is None
        assert out[key]["text"] == reference_text(tiny_llava, [img], prompt or default_prompt, MAX_NEW)
        assert out[key]["tag"] == f"t-{key}"
        assert out[key]["image_tokens"] == 576 and out[key]["completion_tokens"] > 0
        assert out[key]["model"] == tiny_llava and out[key]["backend"] == "transformers/float32/sdpa"
    assert out["from-path"]["text"] == reference_text(tiny_llava, [path_img.read_bytes()], "What is this?", MAX_NEW)
    assert out["chat"]["text"] == reference_text(tiny_llava, [encode(photo("astronaut"))], "Who?", MAX_NEW)

    errors = {k: out[k]["error"] for k in ("corrupt", "empty", "text", "missing", "huge", "long", "badchat")}
    assert errors["corrupt"].startswith("image: truncated or corrupt")
    assert errors["empty"] == "image: empty (0 bytes)"
    assert errors["text"] == "image: cannot identify image file"
    assert errors["missing"] == f"image: not found: {tmp_path / 'nope.jpg'}"
    assert errors["huge"] == "image: 1000x872 exceeds limits.max_pixels=800000"
    assert "exceeds the model's context of 4096 tokens" in errors["long"]
    assert errors["badchat"].startswith("messages: not valid JSON")
    for k in errors:
        assert out[k]["text"] is None and out[k]["tag"] == "x"


def test_llava_next_job_mixed_aspect_ratios_and_multi_image_row(ray_local, tiny_llava_next, tmp_path):
    images = {
        "tall": [resized("astronaut", 480, 640)],
        "wide": [resized("coffee", 300, 900)],
        "landscape": [resized("rocket", 1024, 768)],
        "pair": [resized("chelsea", 300, 451), resized("coffee", 400, 600)],
    }
    rows = [{"id": k, "image": v, "prompt": f"Describe {k}."} for k, v in images.items()]
    schema = pa.schema([("id", pa.string()), ("image", pa.list_(pa.binary())), ("prompt", pa.string())])
    cfg = _job(tiny_llava_next, tmp_path, rows, schema)
    run_job(cfg)
    out = read_output(cfg.output.path)
    assert set(out) == set(images)
    for k, imgs in images.items():
        assert out[k]["error"] is None
        assert out[k]["text"] == reference_text(tiny_llava_next, imgs, f"Describe {k}.", MAX_NEW), k
    assert out["pair"]["image_tokens"] > out["tall"]["image_tokens"]


def test_duplicate_ids_fail_before_any_work(tiny_llava, tmp_path):
    img = resized("coffee", 64, 64)
    rows = [{"id": i, "image": img} for i in (1, 2, 2, 3, 3, 3)]
    cfg = _job(tiny_llava, tmp_path, rows)
    with pytest.raises(JobError, match=r"input: 3 rows repeat an id \(2 ids, e.g. [23]\).*input.duplicate_ids=keep_first"):
        run_job(cfg)
    assert not (tmp_path / "out").exists()


def test_missing_columns_are_named(tiny_llava, tmp_path):
    cfg = _job(tiny_llava, tmp_path, [{"key": 1, "image": b"x"}])
    with pytest.raises(JobError, match=r"input: id column 'id' not found; columns are \['image', 'key'\]"):
        run_job(cfg)
