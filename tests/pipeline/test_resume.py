"""Resume after a stop, --retry-failed, and a model actor killed mid-job: exactly once, always."""

import contextlib
import json
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
from pipeline.manifest import NAME
from pipeline.progress import COLUMNS, Tally
from pipeline.resume import PENDING, checkpoint_path
from tests.conftest import (
    ROOT,
    actor_ids,
    cli_here,
    finished_copy,
    grown,
    own_model_actor,
    read_output,
    reference,
    resized,
    settled,
    value,
    write_parquet,
)

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


def _start_job(path, ray=None) -> subprocess.Popen:
    """`llava-ray run` as a process: on a Ray of its own, or attached to the session's Ray (`ray`)
    through RAY_ADDRESS, as a RayJob's entrypoint attaches to its cluster. An attached job starts
    after the requests earlier killed drivers left there are dropped (`_drop_ray_data_requests`)."""
    env = None
    if ray:
        _drop_ray_data_requests(ray)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path)], cwd=ROOT, start_new_session=True,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _drop_ray_data_requests(ray) -> None:
    """Cancel every request held by Ray Data's autoscaling coordinator (one detached actor per
    Ray). Called while no job runs on the session's Ray, those are killed drivers' requests, and
    this does what their expiry would. A driver that dies without shutting its executor down keeps
    its request for RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S (180 s), and the coordinator splits
    the Ray between it and the next job: on this small Ray the next job's writes then wait for its
    model stage to finish, so nothing is committed mid-job. A user's rerun at once meets that too,
    and the rerun in each killed-and-rerun test still does."""
    from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator

    coordinator = get_or_create_autoscaling_coordinator()
    for requester in ray.get(coordinator.__ray_call__.remote(lambda self: list(self._ongoing_reqs))):
        ray.get(coordinator.cancel_request.remote(requester))


def _kill_attached(proc: subprocess.Popen, ray) -> None:
    """SIGKILL of a driver attached to the session's Ray, then wait until Ray has ended the dead
    job's actors and tasks (every CPU free again): until then a write task of that job can still
    commit a block, so what the run left is counted only after."""
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 120
    while (held := ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0)) > 0:
        assert time.monotonic() < deadline, f"Ray still holds {held} CPUs two minutes after the driver died"
        time.sleep(0.1)


def raylet_pid(node=None) -> int:
    """The raylet of a Ray node (a `ray._private.node.Node`; by default this session's): every
    worker of the node is a process under it."""
    if node is None:
        import ray

        node = ray._private.worker.global_worker.node
    return node.all_processes["raylet"][0].process.pid


def model_actors(root: int) -> dict[int, str]:
    """{pid: process title} of the model actors under process `root`. Ray titles an actor's
    process `ray::<its repr>[.<the method it runs>]`, and Ray Data's repr names the stage:
    `ray::MapWorker(MapBatches(GenerateStage)).__init__` while it loads, `.submit` while it
    answers a batch, and bare both before it loads (a reused idle worker) and between batches."""
    import psutil

    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for p in children:
        try:
            title = p.cmdline()[0]
        except (psutil.Error, IndexError):
            continue
        if "(GenerateStage))" in title:
            found[p.pid] = title
    return found


def _loaded_model_actor(proc, root: int, skip: set[int]) -> int:
    """The pid of the model actor under `root` (not one of `skip`) once it has loaded: seen
    answering a batch, or seen loading and now bare."""
    deadline, loading = time.monotonic() + 240, set()
    while True:
        for pid, title in model_actors(root).items():
            if pid in skip:
                continue
            if title.endswith(".submit") or (pid in loading and not title.endswith(".__init__")):
                return pid
            if title.endswith(".__init__"):
                loading.add(pid)
        if proc.poll() is not None:
            raise AssertionError(f"the job exited {proc.returncode} before its model actor loaded: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "no model actor loaded four minutes after the job started"
        time.sleep(0.01)


SLICE_S = 0.02  # how long the paused model actor runs at a time
WRITE_WAIT_S = 0.2  # after a slice, before the committed rows are counted (a slow write: more slices)


def hold_mid_job(start, committed, n: int, root: int | None = None) -> tuple[subprocess.Popen, int]:
    """Start a job (`start()`) and hold it mid-way whatever the host's speed; returns the job's
    process and its model actor's pid, paused (SIGSTOP). The actor (under process `root`, by
    default the job's own tree) is paused as soon as it has loaded, then runs in slices of SLICE_S
    until `committed()` counts `n` rows. It answers rows only inside a slice, a small share of
    the job, so rows remain that no process has answered: a stop now (a kill, a lost node, a lost
    lease) lands mid-job. Waiting for `n` committed rows alone did not: on a fast host the tiny
    model answered every other row before the kill landed."""
    skip = set(model_actors(root)) if root else set()  # an earlier job's
    proc = start()
    pid = _loaded_model_actor(proc, root or proc.pid, skip)
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 240
        while committed() < n:
            assert proc.poll() is None and time.monotonic() < deadline, f"{committed()} rows committed, not {n}"
            os.kill(pid, signal.SIGCONT)
            time.sleep(SLICE_S)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(WRITE_WAIT_S)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):  # a failed hold leaves the job to finish, not a stopped process
            os.kill(pid, signal.SIGCONT)
        raise
    return proc, pid


def test_a_killed_job_rerun_at_once_resumes_where_it_stopped(ray_local, tiny_llava, tmp_path, caplog):
    """SIGKILL of the whole job tree (an OOM kill, a lost pod), then an immediate rerun: its lease
    names a dead process on this machine, so the rerun takes it over without waiting."""
    path, cfg = _config(tiny_llava, tmp_path, 48)
    proc, _ = hold_mid_job(lambda: _start_job(path), lambda: len(_committed_ids(cfg)), 8)
    _kill_tree(proc.pid)  # the driver and the whole Ray it started, at once, like a lost pod
    proc.wait()
    done = _committed_ids(cfg)
    assert 8 <= len(done) < 48, "the stop should land mid-job"
    for f in Path(cfg.output.path).glob("*.parquet"):  # a stopped job leaves only readable files
        pq.read_table(f)

    rerun = cfg.model_copy(update={"output": cfg.output.model_copy(update={"lease_wait_s": 0.0})})  # no wait allowed
    summary = run_job(rerun)
    out = read_output(cfg.output.path)
    assert set(out) == {f"r{i:03d}" for i in range(48)}
    assert all(r["error"] is None for r in out.values())
    assert summary.rows_processed == 48 - len(done)  # only what was missing
    _assert_counts_equal_output(cfg, summary)

    with caplog.at_level("INFO", logger="pipeline.job"):
        again = run_job(cfg)  # a finished job: nothing left to do, and no actor is started for it
    assert again.rows_processed == 0 and again.rows_total == 48
    assert "output.path: every input id already has its output row; nothing to run" in caplog.messages


def test_a_job_that_lost_its_lease_stops_and_every_row_is_written_once(ray_local, tiny_llava, tmp_path):
    """The holder is paused (SIGSTOP of its whole tree) past its lease's expiry, a second run takes
    the output over and finishes it, then the first resumes (SIGCONT): its fence refuses its next
    block, it exits 1 in one line, and the output holds every row exactly once."""
    import psutil

    path, cfg = _config(tiny_llava, tmp_path, 48)
    proc, _ = hold_mid_job(lambda: _start_job(path), lambda: len(_committed_ids(cfg)), 8)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.send_signal(signal.SIGSTOP)
    try:
        summary = run_job(cfg)  # waits out the paused holder's 5 s expiry, then takes over
    finally:
        for p in tree:
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    assert summary.rows_total == 48
    try:
        assert proc.wait(timeout=180) == 1
    finally:
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    last = proc.stderr.read().strip().splitlines()[-1]
    assert last.startswith("error: output.path: this run's lease ") and last.endswith("it stopped before writing another block"), last
    out = read_output(cfg.output.path)  # asserts every id once
    assert set(out) == {f"r{i:03d}" for i in range(48)}
    assert pads.dataset(cfg.output.path, format="parquet").to_table().num_rows == 48


def test_retry_failed_through_the_cli_reprocesses_only_failed_rows(ray_local, tiny_llava, tmp_path):
    """`--retry-failed fetch,engine` reruns only rows that failed with those kinds (the missing
    images, now there; not the empty file's decode error); the others stay untouched. A bare
    `--retry-failed` (every kind): test_jsonl_output_equals_the_parquet_output_and_resumes."""
    late = [tmp_path / f"late{i}.jpg" for i in range(3)]
    rows = [{"id": i, "image_path": str(p), "prompt": f"Late row {i}, what is it?"} for i, p in enumerate(late)]
    for i in range(3, 9):
        (tmp_path / f"ok{i}.jpg").write_bytes(resized("coffee", 100 + i, 120))
        rows.append({"id": i, "image_path": str(tmp_path / f"ok{i}.jpg"), "prompt": f"Row {i}?"})
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    rows.append({"id": 9, "image_path": str(empty), "prompt": "Empty?"})
    data = {
        "model": {"name": tiny_llava}, "generation": {"max_new_tokens": 8},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows)}, "output": {"path": str(tmp_path / "out")},
        "resources": {"rows_per_block": 3},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(data)
    first = run_job(cfg)
    assert (first.rows_ok, first.failed_by_kind) == (6, {"decode": 1, "fetch": 3})
    before = read_output(cfg.output.path)
    arrived = [resized(name, 150 + 10 * i, 170) for i, name in enumerate(["rocket", "astronaut", "chelsea"])]
    for p, image in zip(late, arrived):  # the missing images arrive
        p.write_bytes(image)

    assert run_job(cfg).rows_processed == 0  # plain resume: failed rows count as done
    res = cli_here("run", str(tmp_path / "job.yaml"), "--retry-failed", "fetch,engine")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "rows ok: 9  rows failed: 1  (total 10, processed this run 3)"
    after = read_output(cfg.output.path)
    for i, image in enumerate(arrived):  # the retried rows: what transformers gives for them
        ref = reference(tiny_llava, [image], f"Late row {i}, what is it?", 8)
        assert (after[i]["text"], after[i]["prompt_tokens"], after[i]["error"]) == (ref.text, ref.prompt_tokens, None)
    assert all(after[i] == before[i] for i in range(3, 10))  # the others untouched, the decode error too
    assert after[9]["error_kind"] == "decode"


def test_model_actor_killed_mid_job_every_row_exactly_once(ray_local, tiny_llava, tmp_path):
    _, cfg = _config(tiny_llava, tmp_path, 40)
    killed, earlier, ended = [], actor_ids(ray_local), threading.Event()

    def kill_model_actor_once():
        """As soon as the model actor is up (alive once its constructor returned): the CPU actor
        has prepared blocks while it loaded, so Ray Data hands it work at once. Waiting for a
        written block instead lost the race in two full-suite runs: the tiny model can answer its
        10 batches before the first write lands, and Ray Data stops the actor once its input is done."""
        while not killed and not ended.is_set():
            if actor := own_model_actor(ray_local, earlier):
                os.kill(actor["pid"], signal.SIGKILL)  # a crash, as the OOM killer would do
                killed.append(len(_committed_ids(cfg)))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_model_actor_once)
    killer.start()
    try:
        summary = run_job(cfg)
    finally:
        ended.set()
        killer.join()
    assert killed, "the model actor was never killed"
    assert killed[0] < 40, "the kill should land mid-job"
    out = read_output(cfg.output.path)
    assert set(out) == {f"r{i:03d}" for i in range(40)}
    assert summary.rows_total == 40 and summary.rows_failed == 0
    rows = pads.dataset(cfg.output.path, format="parquet").to_table().num_rows
    assert rows == 40


def _assert_counts_equal_output(cfg, summary) -> Tally:
    """The summary and the manifest's last entry count exactly the rows in the output; returns
    the tally of the files this run wrote."""
    table = pads.dataset(cfg.output.path, format="parquet").to_table(columns=COLUMNS)
    whole = Tally.of(table)
    assert (summary.rows_total, summary.rows_ok, summary.rows_failed) == (whole.rows, whole.ok, whole.failed)
    last = json.loads((Path(cfg.output.path) / NAME).read_text())[-1]
    assert (last["rows"]["total"], last["rows"]["ok"], last["rows"]["failed"]) == (whole.rows, whole.ok, whole.failed)
    written = [str(Path(cfg.output.path) / name) for name in last["files_written"]]
    ran = Tally.of(pads.dataset(written, format="parquet").to_table(columns=COLUMNS)) if written else Tally()
    assert (summary.rows_processed, summary.generated_tokens) == (ran.rows, ran.generated_tokens)
    assert last["rows"]["processed_this_run"] == ran.rows and last["tokens_this_run"]["generated"] == ran.generated_tokens
    return ran


def test_counts_after_a_stop_mid_commit_equal_the_output(ray_local, metrics_url, tiny_llava, finished, tmp_path):
    """A stop after a block's data file is written but before Ray commits its checkpoint (two
    phases: `<prefix>.pending.parquet`, then renamed) leaves that file; the rerun's Ray deletes
    it and runs its rows again, so it is neither done before the rerun nor written by it."""
    cfg = finished_copy(finished, tiny_llava, tmp_path)  # 6 rows, 3 blocks of 2
    committed = sorted(Path(checkpoint_path(cfg)).glob("*.parquet"))
    assert len(committed) == 3
    block = committed[0]  # that state, exactly: this block's commit undone
    block.rename(block.with_name(block.name[: -len(".parquet")] + PENDING))
    stale = [p for p in Path(cfg.output.path).glob("*.parquet") if p.name.startswith(block.name[: -len(".parquet")])]
    assert len(stale) == 1

    before = settled(metrics_url)
    summary = run_job(cfg)
    assert not stale[0].exists()  # Ray deleted it
    assert set(read_output(cfg.output.path)) == {f"r{i}" for i in range(6)}
    assert (summary.rows_total, summary.rows_processed) == (6, 2)
    ran = _assert_counts_equal_output(cfg, summary)
    counts = {"ray_llava_ray_rows_total": ran.rows, "ray_llava_ray_generated_tokens_total": ran.generated_tokens}
    after = settled(metrics_url, grown(before, counts))
    assert {name: value(after, name) - value(before, name) for name in counts} == counts and ran.rows == 2


def test_an_unreadable_output_file_at_start_is_one_line_naming_it(tiny_llava, tmp_path):
    _, cfg = _config(tiny_llava, tmp_path, 4)
    out = Path(cfg.output.path)
    out.mkdir()
    table = pads.dataset(write_parquet(tmp_path / "ok.parquet", [{"id": "r000"}]), format="parquet").to_table()
    pq.write_table(table, out / "part-1.parquet")
    bad = out / "part-0.parquet"
    bad.write_bytes((tmp_path / "ok.parquet").read_bytes()[:-20])  # cut short, as a write that died
    with pytest.raises(JobError) as e:
        run_job(cfg)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"output.path: {bad} is not a readable Parquet file (")
    assert message.endswith("move it away and rerun: the rows it held run again")

def test_jsonl_output_equals_the_parquet_output_and_resumes(ray_local, tiny_llava, tmp_path):
    """output.format: jsonl: committed per block like Parquet; read back it equals the Parquet
    output of the same job; a rerun processes nothing; a bare `--retry-failed` reruns every
    failed row (here the decode error, which fails again) and leaves the others as they were."""
    from pipeline.storage import output_files, output_rows

    rows = [{"id": i, "image": resized(n, 40 + 8 * i, 56), "prompt": f"Row {i}?"} for i, n in enumerate(["coffee", "rocket", "chelsea"])]
    rows.append({"id": 9, "image": b"not an image", "prompt": None})
    base = {"model": {"name": tiny_llava}, "generation": {"max_new_tokens": 4},
            "input": {"path": write_parquet(tmp_path / "in.parquet", rows)},
            "resources": {"rows_per_block": 2, "model_batch_size": 2, "preprocess_batch_size": 2}}
    columns = ["id", "text", "finish_reason", "prompt_tokens", "image_tokens", "completion_tokens", "model", "backend", "error", "error_kind"]
    outputs = {}
    for fmt in ("parquet", "jsonl"):
        data = base | {"output": {"path": str(tmp_path / fmt), "format": fmt}}
        cfg = load_config(data)
        assert run_job(cfg).rows_ok == 3
        outputs[fmt] = sorted(output_rows(cfg.output.path, cfg.storage, columns).to_pylist(), key=lambda r: r["id"])
    assert outputs["jsonl"] == outputs["parquet"] and len(outputs["jsonl"]) == 4
    assert all(f.endswith(".json") for f in output_files(cfg.output.path, cfg.storage))
    assert run_job(cfg).rows_processed == 0
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))  # the jsonl job's
    res = cli_here("run", str(tmp_path / "job.yaml"), "--retry-failed")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "rows ok: 3  rows failed: 1  (total 4, processed this run 1)"
    again = sorted(output_rows(cfg.output.path, cfg.storage, columns).to_pylist(), key=lambda r: r["id"])
    assert again[:3] == outputs["jsonl"][:3] and again[3]["error_kind"] == "decode"
