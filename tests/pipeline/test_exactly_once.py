"""Exactly once whatever the user does to a job: a second run on the same output, a crashed
run's lease, output and checkpoint damaged by hand, a checkpoint of another input."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray._common.utils import get_default_ray_temp_dir

from pipeline.errors import JobError
from pipeline.job import run_job
from pipeline.lease import lease_path
from pipeline.resume import checkpoint_path
from tests.conftest import ROOT, finished_copy, read_output, small_job, with_model_actor_paused

pytestmark = pytest.mark.slow


def _rows(cfg) -> int:
    return pq.ParquetDataset(cfg.output.path).read().num_rows


def test_a_second_run_on_the_same_output_refuses_and_the_first_finishes(ray_local, tiny_llava, tmp_path):
    """`llava-ray run` on an output a running job holds (here a job on the session's Ray, its
    model actor paused meanwhile so it cannot finish first): one line, exit 1, before Ray starts;
    the first finishes, every row once."""
    path, cfg = small_job(tiny_llava, tmp_path, n=24)
    lease = Path(lease_path(cfg))

    def second():
        holder = json.loads(lease.read_text())["owner"]
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path), "--set", "output.lease_wait_s=0"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, stderr = proc.communicate(timeout=240)
        return holder, proc, stderr

    summary, (holder, second, stderr) = with_model_actor_paused(ray_local, lambda: run_job(cfg), second)
    assert second.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: output.path: another run is writing this output ({holder}, heartbeat "), lines
    # refused before Ray starts: no Ray session of its own (Ray names a session after the pid that
    # started it, as this test process's own Ray is named)
    sessions = lambda pid: list(Path(get_default_ray_temp_dir()).glob(f"session_*_{pid}"))  # noqa: E731
    assert sessions(os.getpid()) and not sessions(second.pid)
    assert summary.rows_processed == 24
    out = read_output(cfg.output.path)  # asserts every id once
    assert len(out) == 24 and _rows(cfg) == 24
    assert not lease.exists()  # released at the end


@pytest.mark.parametrize("age, refused", [(5, True), (1000, False)])
def test_a_live_lease_refuses_and_an_expired_one_is_taken_over(ray_local, tiny_llava, finished, tmp_path, age, refused):
    """On a finished output (a RayJob retried after a crash at its very end): a live lease refuses
    and changes no file, an expired one is taken over, and the run finishes and releases it. A
    takeover that then runs rows: test_resume.py (a dead holder's, and an expired holder's)."""
    cfg = finished_copy(finished, tiny_llava, tmp_path, lease_wait_s=0)
    Path(lease_path(cfg)).write_text(json.dumps({"owner": "crashed-host:123:abcd", "heartbeat": time.time() - age, "expiry_s": 90}))
    files = lambda: sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file())  # noqa: E731
    if refused:
        before = files()
        with pytest.raises(JobError) as e:
            run_job(cfg)
        assert str(e.value).startswith("output.path: another run is writing this output (crashed-host:123:abcd, heartbeat 5 s ago)")
        assert files() == before  # the output, its checkpoint and manifest, and the lease untouched
    else:
        summary = run_job(cfg)
        assert (summary.rows_ok, summary.rows_processed) == (6, 0) and _rows(cfg) == 6
        assert not Path(lease_path(cfg)).exists()


def test_hand_damaged_output_and_checkpoint_are_reconciled(ray_local, tiny_llava, finished, tmp_path):
    cfg = finished_copy(finished, tiny_llava, tmp_path)
    reference = read_output(cfg.output.path)
    assert len(reference) == 6

    shutil.rmtree(checkpoint_path(cfg))  # checkpoint gone, output kept: nothing may run twice
    again = run_job(cfg)
    assert (again.rows_processed, again.rows_total) == (0, 6) and _rows(cfg) == 6

    one = sorted(Path(cfg.output.path).glob("*.parquet"))[0]  # one data file gone: exactly its rows again
    lost = set(pq.read_table(one).column("id").to_pylist())
    one.unlink()
    again = run_job(cfg)
    assert again.rows_processed == len(lost) and _rows(cfg) == 6

    shutil.rmtree(cfg.output.path)  # output gone, checkpoint kept: everything again
    again = run_job(cfg)
    assert (again.rows_processed, again.rows_total) == (6, 6)
    assert {k: v["text"] for k, v in read_output(cfg.output.path).items()} == {k: v["text"] for k, v in reference.items()}


def test_a_checkpoint_of_other_ids_is_one_line(ray_local, tiny_llava, finished, tmp_path):
    finished_copy(finished, tiny_llava, tmp_path)
    _, other = small_job(tiny_llava, tmp_path, ids=[1, 2, 3])  # int ids on the output of string ids
    with pytest.raises(JobError) as e:
        run_job(other)
    assert str(e.value) == ("output.path: the existing checkpoint has string ids but the input's are int64; this output "
                            "belongs to another input. Use another output.path, or output.mode=overwrite")
