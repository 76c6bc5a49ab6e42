"""What a job shows while it runs and after: Prometheus metrics on the embedded Ray's port,
progress lines with an ETA, the run manifest, and error kinds in each (retrying by kind: test_resume.py)."""

import json
import re
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import load_config
from pipeline.job import run_job
from pipeline.manifest import NAME
from pipeline.progress import Progress, Tally
from tests.conftest import (
    ROOT,
    free_port,
    read_output,
    resized,
    scrape,
    value,
    write_parquet,
)

SECRET = "sekret-key-do-not-write"


def _rows(tmp_path, n_good=8):
    rows = [{"id": f"g{i}", "image": resized("coffee", 100 + i, 120), "image_path": None, "prompt": f"Row {i}?"} for i in range(n_good)]
    rows += [{"id": "empty", "image": b"", "image_path": None, "prompt": None},  # decode
             {"id": "missing", "image": None, "image_path": str(tmp_path / "later.png"), "prompt": None}]  # fetch
    return rows


def _data(ckpt, tmp_path, rows, **extra):
    return {
        "model": {"name": ckpt}, "generation": {"max_new_tokens": 4},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows)}, "output": {"path": str(tmp_path / "out")},
        "resources": {"rows_per_block": 2, "model_batch_size": 2, "preprocess_batch_size": 2},
        "storage": {"key": SECRET, "secret": SECRET}, **extra,
    }


def _output_counts(path) -> dict:
    table = pq.ParquetDataset(path).read()
    out = table.to_pylist()
    kinds = {}
    for r in out:
        key = ("ok", "none") if r["error"] is None else ("error", r["error_kind"])
        kinds[key] = kinds.get(key, 0) + 1
    return {"rows": kinds, "prompt": sum(r["prompt_tokens"] for r in out), "image": sum(r["image_tokens"] for r in out),
            "generated": sum(r["completion_tokens"] for r in out)}


@pytest.mark.slow
def test_metrics_scraped_while_the_job_runs_equal_the_output_and_progress_reaches_100(tiny_llava, tmp_path):
    port = free_port()
    data = _data(tiny_llava, tmp_path, _rows(tmp_path), observability={"metrics_port": port, "progress_interval_s": 1})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(tmp_path / "job.yaml")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last, scrapes = {}, 0
    while proc.poll() is None:
        try:
            samples = scrape(f"http://127.0.0.1:{port}/metrics")
            if samples:
                last, scrapes = samples, scrapes + 1
        except OSError:  # not up yet, or already gone
            pass
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert scrapes >= 3  # seen while running, over real HTTP

    counts = _output_counts(tmp_path / "out")
    scraped = {key: value(last, "ray_llava_ray_rows_total", status=key[0], kind=key[1]) for key in counts["rows"]}
    assert scraped == counts["rows"] == {("ok", "none"): 8, ("error", "decode"): 1, ("error", "fetch"): 1}
    assert value(last, "ray_llava_ray_rows_total") == 10  # nothing else
    assert (value(last, "ray_llava_ray_prompt_tokens_total"), value(last, "ray_llava_ray_image_tokens_total"),
            value(last, "ray_llava_ray_generated_tokens_total")) == (counts["prompt"], counts["image"], counts["generated"])
    assert value(last, "ray_llava_ray_images_total") == 8  # one per row that prepared (decode/fetch errors: none)
    assert value(last, "ray_llava_ray_stage_seconds_count", stage="preprocess") >= 1
    assert value(last, "ray_llava_ray_stage_seconds_count", stage="generate") >= 1

    lines = [line for line in stderr.splitlines() if "progress:" in line]
    assert len(lines) >= 2, stderr[-2000:]
    assert re.search(r"progress: 10/10 rows \(100\.0%\), ok 8, failed 2, [\d.]+ rec/s, [\d.]+ generated tokens/s, ETA 0s$", lines[-1]), lines[-1]
    assert "failures by kind: decode 1, fetch 1" in stdout


def _write_part(folder, name, n, failed=0):
    rows = [{"id": f"{name}-{i}", "error": "image: x" if i < failed else None, "error_kind": "decode" if i < failed else None,
             "prompt_tokens": 10, "image_tokens": 8, "completion_tokens": 3} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")


def test_progress_eta_of_a_run_at_a_known_rate(tmp_path):
    """10 rows every 2 s of a 100-row job: after 3 polls, 70 rows remain at 5 rows/s, 14 s."""
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config({"model": {"name": "m"}, "input": {"path": "x"}, "output": {"path": str(out)}})
    now = [0.0]
    progress = Progress(cfg, Tally(), total=100, clock=lambda: now[0], record_metrics=False)
    for tick in range(3):
        _write_part(out, f"part{tick}", 10, failed=1)
        now[0] += 2.0
        line = progress.poll()
    remaining_s = 70 / 5.0
    eta = progress.eta_s(5.0)
    assert abs(eta - remaining_s) <= 0.25 * remaining_s
    assert line == "progress: 30/100 rows (30.0%), ok 27, failed 3, 5.00 rec/s, 15.0 generated tokens/s, ETA 14s"


def test_progress_of_a_resumed_run_counts_the_rows_already_done(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config({"model": {"name": "m"}, "input": {"path": "x"}, "output": {"path": str(out)}})
    before = Tally(rows=60, failed=2, files=[])
    now = [0.0]
    progress = Progress(cfg, before, total=100, clock=lambda: now[0], record_metrics=False)
    _write_part(out, "new", 20)
    now[0] += 4.0
    assert progress.poll() == "progress: 80/100 rows (80.0%), ok 78, failed 2, 5.00 rec/s, 15.0 generated tokens/s, ETA 4s"


@pytest.mark.slow
def test_manifest_of_a_run_and_a_resumed_run(ray_local, tiny_llava, tmp_path):
    rows = _rows(tmp_path, n_good=4)
    cfg = load_config(_data(tiny_llava, tmp_path, rows, serve={"api_key": SECRET}))
    first = run_job(cfg)
    more = rows + [{"id": f"new{i}", "image": resized("rocket", 90 + i, 100), "image_path": None, "prompt": "More?"} for i in range(3)]
    cfg2 = load_config(_data(tiny_llava, tmp_path, more, serve={"api_key": SECRET}))
    second = run_job(cfg2)  # resumes: only the 3 new rows run
    manifest = tmp_path / "out" / NAME
    text = manifest.read_text()
    assert SECRET not in text
    entries = json.loads(text)
    assert len(entries) == 2 and second.manifest == str(manifest) and first.manifest == str(manifest)
    a, b = entries
    counts = _output_counts(tmp_path / "out")
    assert b["rows"] == {"total": 9, "ok": 7, "failed": 2, "processed_this_run": 3, "ok_this_run": 3, "failed_this_run": 0}
    assert sum(counts["rows"].values()) == b["rows"]["total"] and counts["rows"][("ok", "none")] == b["rows"]["ok"]
    assert a["rows"]["processed_this_run"] == 6 and a["failures_by_kind"] == b["failures_by_kind"] == {"decode": 1, "fetch": 1}
    out_files = sorted(p.name for p in (tmp_path / "out").glob("*.parquet"))
    assert sorted(a["files_written"] + b["files_written"]) == out_files
    written = read_output(tmp_path / "out")
    assert b["tokens_this_run"]["generated"] == sum(written[f"new{i}"]["completion_tokens"] for i in range(3))
    assert b["config"]["storage"]["key"] == "<redacted>" and b["config"]["serve"]["api_key"] == "<redacted>"
    assert b["model"]["checkpoint"].startswith("sha256:") and b["backend"] == "transformers/float32/sdpa"
    assert set(b["versions"]) >= {"llava-ray", "ray", "transformers", "torch"}
    assert b["started_at"] <= b["ended_at"] and b["seconds"] > 0
    pq.ParquetDataset(tmp_path / "out").read()  # readers of the folder skip the manifest
