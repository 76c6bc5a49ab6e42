"""`llava-ray plan`: each row's counts and predicted error equal what the real job gives that row,
the totals scale a sample up and say so, and the FLOPs equal a count done by hand.

The reference is always the job itself (its CPU and model stages, or a real run on Ray): the
plan shares the Preprocessor's path, so what it must match is the job's output columns. What
only decoding can find (corrupt pixel data after a valid header, NaN pixels) is the one thing
it does not predict, and the tests name exactly those rows.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.checkpoint import Checkpoint
from pipeline.config import load_config
from pipeline.flops import ModelFlops
from pipeline.job import run_job
from pipeline.plan import plan_job, summarize
from pipeline.stages import GenerateStage, PlanStage, PreprocessStage
from tests.conftest import cli_here, encode, read_output, saved
from tests.photos import encoded, picture
from tests.pipeline.test_bad_input import _config as bad_input_config
from tests.pipeline.test_bad_input import _table as bad_input_table
from tests.pipeline.test_bad_input import corpus as bad_input_corpus

# Rows whose header reads but whose pixels do not decode: the job finds them, a plan cannot.
UNPREDICTABLE = {"truncated_jpeg", "nan_tiff"}


def _compare(job: dict, plan: dict) -> set:
    """Assert the plan equals the job on every row it predicts; return the ids it did not predict."""
    assert set(job) == set(plan)
    missed = set()
    for key, got in job.items():
        want = plan[key]
        if got["error"] is None:
            assert want["predicted_error"] is None, (key, want["predicted_error"])
            assert (want["image_tokens"], want["prompt_tokens"]) == (got["image_tokens"], got["prompt_tokens"]), key
        elif want["predicted_error"] is None:
            missed.add(key)
        else:
            assert (want["predicted_error"], want["predicted_error_kind"]) == (got["error"], got["error_kind"]), key
    return missed


def test_plan_stage_predicts_every_bad_input_row_the_stages_fail(tiny_llava, tmp_path):
    """The bad-input corpus (tests/pipeline/test_bad_input.py: ~50 kinds of broken rows) through
    the job's stages and the plan's, called as Ray Data calls them."""
    rows, _ = bad_input_corpus(tmp_path)
    data = bad_input_config(tiny_llava, tmp_path)
    table = bad_input_table(rows)
    hf = [i for i, r in enumerate(rows) if r["hf"] is not None]
    job, plan = {}, {}
    for indices, image_column in (([i for i in range(len(rows)) if i not in hf], "image"), (hf, "hf")):
        cfg = {**data, "input": {**data["input"], "columns": {"image": image_column}}}
        part = table.take(indices)
        job.update({r["id"]: r for r in GenerateStage(cfg)(PreprocessStage(cfg)(part)).drop_columns(["tag"]).to_pylist()})
        planned = PlanStage(cfg)(part)
        assert planned.column_names == ["id", "images", "image_tokens", "prompt_tokens", "tiles", "predicted_error", "predicted_error_kind"]
        plan.update({r["id"]: r for r in planned.to_pylist()})
    assert _compare(job, plan) == UNPREDICTABLE
    assert sum(r["error"] is not None for r in job.values()) - len(UNPREDICTABLE) >= 30  # predicted failures


def _mixed_corpus(tmp_path) -> pa.Table:
    """Photo sizes and aspect ratios (distinct AnyRes grids), bad images, over-limit images,
    a long prompt, two images, a bad conversation."""
    on_disk = tmp_path / "chelsea.jpg"
    on_disk.write_bytes(encoded("chelsea", 300, 451))
    two = json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(on_disk)}},
                                                    {"type": "image_url", "image_url": {"url": str(on_disk)}}]}])
    rows = [
        {"id": "square", "image": encoded("astronaut", 300, 300)},
        {"id": "wide", "image": encoded("chelsea", 300, 451, "PNG"), "prompt": "What animal is this?"},
        {"id": "tall", "image": encoded("rocket", 640, 240)},
        {"id": "phone", "image": encoded("coffee", 1200, 1800)},
        {"id": "path", "image_path": str(on_disk)},
        {"id": "long_prompt", "image": encoded("astronaut", 300, 300), "prompt": "describe " * 3000},
        {"id": "placeholder", "image": encoded("astronaut", 300, 300), "prompt": "What is <image>?"},
        {"id": "two_images", "messages": two},
        {"id": "bad_messages", "image": encoded("astronaut", 300, 300), "messages": "{not json"},
        {"id": "truncated_jpeg", "image": encoded("coffee", 400, 600)[:3000]},
        {"id": "not_an_image", "image": b"hello, I am not an image\n" * 10},
        {"id": "missing", "image_path": str(tmp_path / "nope.jpg")},
        {"id": "too_many_pixels", "image": encode(np.zeros((2100, 2000, 3), np.uint8))},
        {"id": "too_thin", "image": encode(np.zeros((20000, 1, 3), np.uint8))},
        {"id": "too_many_bytes", "image": encode(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))},
    ]
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("image_path", pa.string()),
                        ("prompt", pa.string()), ("messages", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _job_config(ckpt: str, tmp_path) -> dict:
    return {
        "model": {"name": ckpt}, "generation": {"max_new_tokens": 4},
        "input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "out"), "mode": "overwrite"},
        "limits": {"max_pixels": 4_000_000, "max_image_bytes": 1_000_000, "max_prompt_tokens": 3000},
        "resources": {"rows_per_block": 4, "preprocess_batch_size": 4, "model_batch_size": 4},
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_plan_equals_the_real_job_row_by_row(ray_local, request, tmp_path, family):
    ckpt = request.getfixturevalue("tiny_llava" if family == "llava" else "tiny_llava_next")
    pq.write_table(_mixed_corpus(tmp_path), tmp_path / "in.parquet")
    cfg = load_config(_job_config(ckpt, tmp_path))
    report, per_row = plan_job(cfg)
    summary = run_job(cfg)
    job = read_output(cfg.output.path)
    plan = {r["id"]: r for r in per_row.to_pylist()}
    assert _compare(job, plan) == {"truncated_jpeg"}
    ok = [r for r in job.values() if r["error"] is None]
    assert len(ok) == {"llava": 5, "llava_next": 6}[family]  # NeXT takes the two-image row (up to 4)
    if family == "llava_next":  # AnyRes: the sizes give distinct token counts, all matched above
        assert len({r["image_tokens"] for r in ok}) >= 3
    # The totals are the rows' sums; the job's one unpredicted failure runs in the plan.
    assert (report.rows, report.rows_ok, report.rows_failed) == (summary.rows_total, summary.rows_ok + 1, summary.rows_failed - 1)
    assert report.failed_by_kind == {k: n - (k == "decode") for k, n in summary.failed_by_kind.items() if n - (k == "decode")}
    planned_ok = [plan[k] for k in job if plan[k]["predicted_error"] is None]
    assert report.image_tokens == sum(r["image_tokens"] for r in planned_ok)
    assert report.prompt_tokens == sum(r["prompt_tokens"] for r in planned_ok)
    assert report.largest_row.prompt_tokens == max(r["prompt_tokens"] for r in plan.values() if r["prompt_tokens"])


def _hand_flops(prompt: int, new: int) -> dict[str, int]:
    """The tiny checkpoints' config by hand (pipeline/tiny.py): CLIP 336/14, width 64, MLP 128,
    2 layers, feature layer -2 (1 layer run), 'default' strategy; a 2-layer text model, width 64,
    MLP 128, 2 heads of 32, vocabulary 293. Every term counted token by token."""
    patches, tokens, d, f = 24 * 24, 24 * 24 + 1, 64, 128
    vision = 2 * patches * (3 * 14 * 14) * d  # patch embedding (a 14x14 conv)
    vision += 2 * tokens * (3 * d * d) + 2 * tokens * d * d + 2 * tokens * 2 * d * f  # qkv, o, MLP
    vision += 2 * tokens * tokens * d * 2  # scores and weighted values
    projector = 2 * patches * (d * d + d * d)
    per_token = 2 * (3 * d * d + d * d + 3 * d * f) * 2  # 2 layers, gated MLP
    logits = 2 * d * 293
    prefill = sum(per_token + 2 * 2 * i * d * 2 for i in range(1, prompt + 1)) + logits
    decode = sum(per_token + 2 * 2 * (prompt + j) * d * 2 + logits for j in range(1, new))
    return {"vision": vision, "projector": projector, "prefill": prefill, "decode": decode}


def test_flops_of_a_known_config_equal_a_hand_count(tiny_llava):
    model = ModelFlops.read(Checkpoint.load(load_config({"model": {"name": tiny_llava}}).model).config)
    hand = _hand_flops(600, 16)
    assert model.vision_per_tile == hand["vision"]
    assert model.projector_per_tile == hand["projector"]
    assert model.prefill(np.array([600]))[0] == hand["prefill"]
    assert model.decode(np.array([600]), 16)[0] == hand["decode"]


@pytest.mark.parametrize("layout", ["llava-1.5-7b", "llava-interleave-qwen-0.5b"])
def test_the_projector_runs_on_what_the_processor_counts_as_image_tokens(tmp_path, layout):
    """CLIP with its CLS dropped ('default'), SigLIP without one, all kept ('full'): the features
    per tile are the image tokens the checkpoint's processor expands one image to."""
    from pipeline.tiny import build_tiny_checkpoint

    checkpoint = Checkpoint.load(load_config({"model": {"name": str(build_tiny_checkpoint(tmp_path / layout, layout))}}).model)
    assert ModelFlops.read(checkpoint.config).features == checkpoint.images.tokens([(300, 400)])[0] == {"llava-1.5-7b": 576}.get(layout, 729)


def _per_row() -> pa.Table:
    """A plan's per-row table: two rows that fit, one missing image, one prompt too long."""
    return pa.table({
        "id": ["a", "b", "c", "d"], "images": [1, 1, None, 1], "image_tokens": [576, 576, None, 576],
        "prompt_tokens": [600, 590, None, 5000], "tiles": [1, 1, None, 1],
        "predicted_error": [None, None, "image: not found: x", "prompt: too long"],
        "predicted_error_kind": [None, None, "fetch", "limits"],
    })


def test_a_sample_is_scaled_up_and_says_so(tiny_llava):
    """summarize over a sample of 4 rows of a 1000-row input: every total x250."""
    cfg = load_config({"model": {"name": tiny_llava}, "generation": {"max_new_tokens": 16}, "input": {"path": "in.parquet"}})
    checkpoint = Checkpoint.load(cfg.model)
    per_row = _per_row()
    report = summarize(cfg, checkpoint, per_row, rows=1000, seconds=1.0)
    assert (report.sampled, report.rows_planned, report.scale) == (True, 4, 250.0)
    assert (report.rows_ok, report.rows_failed, report.failed_by_kind) == (500, 500, {"fetch": 250, "limits": 250})
    assert (report.images, report.image_tokens, report.prompt_tokens) == (500, 250 * 1152, 250 * 1190)
    assert report.new_tokens == 500 * 16
    assert report.largest_row.id == "d" and report.needs.max_model_len == 5016 and not report.needs.fits_model
    hand = [_hand_flops(p, 16) for p in (600, 590)]
    assert report.flops.total == pytest.approx(250 * sum(sum(h.values()) for h in hand), rel=1e-12)
    a100 = next(g for g in report.gpus if g.gpu == "A100")
    assert a100.gpu_hours == pytest.approx(report.flops.total / (312e12 * 0.40) / 3600)
    whole = summarize(cfg, checkpoint, per_row, rows=4, seconds=1.0)
    assert (whole.sampled, whole.scale, whole.rows_ok) == (False, 1.0, 2)


def test_gpu_peaks_and_mfu_from_set_and_the_vllm_context(tiny_llava):
    """`--set 'plan.gpus={...}'` replaces the GPU table and `plan.mfu` the assumed utilisation; on
    backend vllm the rows are counted against vllm.max_model_len when it is below the model's context."""
    base = {"model": {"name": tiny_llava}, "generation": {"max_new_tokens": 16}, "input": {"path": "in.parquet"}}
    cfg = load_config(base, ["plan.gpus={B200: 2250, H100: 989}", "plan.mfu=0.5"])
    checkpoint = Checkpoint.load(cfg.model)
    report = summarize(cfg, checkpoint, _per_row(), rows=4, seconds=1.0)
    assert [(g.gpu, g.peak_tflops) for g in report.gpus] == [("B200", 2250), ("H100", 989)]
    assert report.gpus[0].gpu_hours == pytest.approx(report.flops.total / (2250e12 * 0.5) / 3600)
    vllm = load_config({**base, "backend": "vllm", "resources": {"num_gpus_per_actor": 1}, "vllm": {"max_model_len": 1024}})
    assert checkpoint.context_len > 1024 and report.context_len == checkpoint.context_len
    assert summarize(vllm, checkpoint, _per_row(), rows=4, seconds=1.0).context_len == 1024


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_plan_prints_the_table_and_writes_json_and_rows(ray_local, tiny_llava_next, tmp_path):
    pq.write_table(_mixed_corpus(tmp_path), tmp_path / "in.parquet")
    (tmp_path / "job.yaml").write_text(json.dumps(_job_config(tiny_llava_next, tmp_path)))
    res = cli_here("plan", str(tmp_path / "job.yaml"), "--sample", "5", "--json", str(tmp_path / "plan.json"),
                   "--rows", str(tmp_path / "rows.parquet"), "--mfu", "0.5", "--set", "generation.max_new_tokens=8")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "SAMPLE: 5 of 15 rows, drawn uniformly; every total below is scaled x3" in out
    for label in ("rows", "will run", "will fail", "images", "prompt tokens", "new tokens", "model FLOPs", "GPU-hours at 50% MFU"):
        assert label in out, label
    for gpu in ("A10G", "L4", "A100", "H100", "H200"):
        assert any(line.startswith(gpu) for line in out.splitlines()), gpu
    totals = json.loads((tmp_path / "plan.json").read_text())
    rows = pq.read_table(tmp_path / "rows.parquet")
    assert rows.column_names == ["id", "images", "image_tokens", "prompt_tokens", "tiles", "predicted_error", "predicted_error_kind"]
    assert (rows.num_rows, totals["rows"], totals["rows_planned"], totals["sampled"], totals["mfu"]) == (5, 15, 5, True, 0.5)
    ok = [r for r in rows.to_pylist() if r["predicted_error"] is None]
    assert totals["rows_ok"] == 3 * len(ok)
    assert totals["prompt_tokens"] == 3 * sum(r["prompt_tokens"] for r in ok)
    assert totals["new_tokens"] == 3 * 8 * len(ok)


def _exif(orientation: int):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return exif


def _png_with_exif_chunk(img, orientation: int, after_pixels: bool) -> bytes:
    """A PNG whose eXIf chunk sits before its pixels, or after them (PIL finds that one only by
    decoding)."""
    import struct
    import zlib

    payload = _exif(orientation).tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    data = saved(img, "PNG")
    at = data.index(b"IEND" if after_pixels else b"IDAT") - 4
    return data[:at] + chunk + data[at:]


def test_exif_orientation_turns_the_anyres_count_as_the_job_does(tiny_llava_next, tmp_path):
    """LLaVA-NeXT counts a 300x900 photo and its quarter turn differently; the header-only read
    finds the orientation wherever it is (JPEG APP1, PNG eXIf before or after the pixels)."""
    img = picture("chelsea", 300, 900)
    images = {"png": saved(img, "PNG"), "png_exif_first": _png_with_exif_chunk(img, 6, False),
              "png_exif_last": _png_with_exif_chunk(img, 6, True), "jpeg_exif": saved(img, "JPEG", exif=_exif(6))}
    assert Image.open(io.BytesIO(images["png_exif_last"])).getexif().get(0x0112) == 6
    table = pa.table({"id": list(images), "image": pa.array(list(images.values()), pa.binary())})
    cfg = {"model": {"name": tiny_llava_next}, "input": {"path": str(tmp_path / "in.parquet")}}
    tokens = {}
    for job, plan in zip(PreprocessStage(cfg)(table).to_pylist(), PlanStage(cfg)(table).to_pylist()):
        assert job["error"] is None and plan["predicted_error"] is None
        prompt_tokens = int(np.frombuffer(job["_input_id_runs"], np.int32).sum())
        assert (plan["image_tokens"], plan["prompt_tokens"]) == (job["_image_tokens"], prompt_tokens), plan["id"]
        tokens[plan["id"]] = plan["image_tokens"]
    assert tokens["png"] != tokens["png_exif_first"] == tokens["png_exif_last"] == tokens["jpeg_exif"]
