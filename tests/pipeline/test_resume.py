"""Resume after a stop, --retry-failed, and a model actor killed mid-job: exactly once, always."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import JobError
from pipeline.job import run_job
from pipeline.resume import checkpoint_path
from tests.conftest import ROOT, cli, read_output, reference, resized, write_parquet

pytestmark = pytest.mark.slow


def _config(ckpt, tmp_path, n_rows, **resources):
    images = [resized(name, 200 + 7 * i, 260) for i, name in enumerate(["astronaut", "coffee", "rocket", "chelsea"])]
    rows = [{"id": f"r{i:03d}", "image": images[i % 4], "prompt": f"Row {i}?"} for i in range(n_rows)]
    data = {
        "model": {"name": ckpt},
        "generation": {"max_new_tokens": 24},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows)},
        "resources": {"rows_per_block": 4, "model_batch_size": 4, "preprocess_batch_size": 4, **resources},
        "output": {"path": str(tmp_path / "out"), "lease_expiry_s": 5},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path)


def _committed_ids(cfg) -> set:
    root = Path(checkpoint_path(cfg))
    files = [p for p in root.glob("*.parquet") if not p.name.endswith(".pending.parquet")]
    return {v for p in files for v in pq.read_table(p).column("id").to_pylist()}


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant together (Ray's raylet and GCS start sessions of
    their own, so a process-group kill alone leaves workers that can still commit a block)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def test_stopped_job_resumes_where_it_stopped(ray_local, tiny_llava, tmp_path):
    path, cfg = _config(tiny_llava, tmp_path, 48)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(path)], cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while len(_committed_ids(cfg)) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    _kill_tree(proc.pid)  # the driver and the whole Ray it started, at once, like a lost pod
    proc.wait()
    with pytest.raises(JobError, match="another run is writing this output"):  # its lease is still live
        run_job(cfg)
    time.sleep(cfg.output.lease_expiry_s)  # then it expires, and the rerun takes it over
    done = _committed_ids(cfg)
    assert 8 <= len(done) < 48, "the stop should land mid-job"
    for f in Path(cfg.output.path).glob("*.parquet"):  # a stopped job leaves only readable files
        pq.read_table(f)

    summary = run_job(cfg)
    out = read_output(cfg.output.path)
    assert set(out) == {f"r{i:03d}" for i in range(48)}
    assert all(r["error"] is None for r in out.values())
    assert summary.rows_processed == 48 - len(done)  # only what was missing

    again = run_job(cfg)  # a finished job: nothing left to do
    assert again.rows_processed == 0 and again.rows_total == 48


def test_retry_failed_through_the_cli_reprocesses_only_failed_rows(ray_local, tiny_llava, tmp_path):
    late = [tmp_path / f"late{i}.jpg" for i in range(3)]
    rows = [{"id": i, "image_path": str(p), "prompt": f"Late row {i}, what is it?"} for i, p in enumerate(late)]
    for i in range(3, 9):
        (tmp_path / f"ok{i}.jpg").write_bytes(resized("coffee", 100 + i, 120))
        rows.append({"id": i, "image_path": str(tmp_path / f"ok{i}.jpg"), "prompt": f"Row {i}?"})
    data = {
        "model": {"name": tiny_llava}, "generation": {"max_new_tokens": 8},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows)}, "output": {"path": str(tmp_path / "out")},
        "resources": {"rows_per_block": 3},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(data)
    first = run_job(cfg)
    assert (first.rows_ok, first.rows_failed) == (6, 3)
    before = read_output(cfg.output.path)
    arrived = [resized(name, 150 + 10 * i, 170) for i, name in enumerate(["rocket", "astronaut", "chelsea"])]
    for p, image in zip(late, arrived):  # the missing images arrive
        p.write_bytes(image)

    assert run_job(cfg).rows_processed == 0  # plain resume: failed rows count as done
    res = cli("run", str(tmp_path / "job.yaml"), "--retry-failed")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "rows ok: 9  rows failed: 0  (total 9, processed this run 3)"
    after = read_output(cfg.output.path)
    for i, image in enumerate(arrived):  # the retried rows: what transformers gives for them
        ref = reference(tiny_llava, [image], f"Late row {i}, what is it?", 8)
        assert (after[i]["text"], after[i]["prompt_tokens"], after[i]["error"]) == (ref.text, ref.prompt_tokens, None)
    assert all(after[i] == before[i] for i in range(3, 9))  # the others untouched


def _own_model_actor(ray) -> dict | None:
    """This driver's live model actor, as Ray's GCS records it (actor id, node, pid): never a
    process picked by name, which could belong to another Ray on the machine."""
    from ray._private.state import (
        actors,  # the GCS actor table; the public state API needs the dashboard
    )

    job = ray.get_runtime_context().get_job_id()
    node = ray.get_runtime_context().get_node_id()
    for actor_id, info in actors().items():
        if (info["JobID"] == job and info["State"] == "ALIVE" and "GenerateStage" in info["ActorClassName"]
                and info["Address"]["NodeID"] == node):
            return {"actor_id": actor_id, "pid": info["Pid"]}
    return None


def test_model_actor_killed_mid_job_every_row_exactly_once(ray_local, tiny_llava, tmp_path):
    _, cfg = _config(tiny_llava, tmp_path, 40)
    killed = []

    def kill_model_actor_once():
        deadline = time.monotonic() + 180
        while not killed and time.monotonic() < deadline:
            if list(Path(cfg.output.path).glob("*.parquet")) and (actor := _own_model_actor(ray_local)):
                os.kill(actor["pid"], signal.SIGKILL)  # a crash, as the OOM killer would do
                killed.append(actor)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_model_actor_once)
    killer.start()
    summary = run_job(cfg)
    killer.join()
    assert killed, "the model actor was never killed"
    out = read_output(cfg.output.path)
    assert set(out) == {f"r{i:03d}" for i in range(40)}
    assert summary.rows_total == 40 and summary.rows_failed == 0
    rows = pads.dataset(cfg.output.path, format="parquet").to_table().num_rows
    assert rows == 40
