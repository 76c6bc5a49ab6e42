"""One writer per output (pipeline/lease.py) as plain objects, on local disk and on S3 (moto on
loopback, behind a proxy that slows every PUT by 300 ms): the store arbitrates, a dead holder on
this machine is taken over at once, a silent holder elsewhere is waited for, a beating one is
refused, and a holder that lost its lease is fenced off."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import JobError, LeaseLost
from pipeline.lease import Lease, lease_path
from tests.conftest import BUCKET, ROOT, s3_fs, s3_storage
from tests.slow_proxy import SlowProxy


def _cfg(out: str, storage: dict | None = None, **output):
    return load_config({"model": {"name": "unused"}, "input": {"path": "unused.parquet"},
                        "output": {"path": out, **output}, **({"storage": storage} if storage else {})})


def _held(cfg) -> dict:
    return json.loads(Path(lease_path(cfg)).read_text())


def _other_host(heartbeat_age: float, expiry_s: float = 90) -> bytes:
    return json.dumps({"owner": "other-pod:7:beef", "host": "other-pod", "boot_id": "b", "pid": 7, "run": "beef",
                       "heartbeat": time.time() - heartbeat_age, "expiry_s": expiry_s}).encode()


def test_one_holder_at_a_time_and_release_frees_it(tmp_path):
    cfg = _cfg(str(tmp_path / "out"), lease_wait_s=0)
    first = Lease(cfg).acquire()
    with pytest.raises(JobError) as e:
        Lease(cfg).acquire()
    assert str(e.value).startswith(f"output.path: another run is writing this output ({first.owner}, heartbeat 0 s ago)")
    first.release()
    assert not Path(lease_path(cfg)).exists()
    with Lease(cfg) as second:
        assert _held(cfg)["run"] == second.run


_HOLDER = """
import sys, time
from pipeline.config import load_config
from pipeline.lease import Lease
cfg = load_config({"model": {"name": "unused"}, "input": {"path": "x"}, "output": {"path": sys.argv[1], "lease_expiry_s": 5}})
lease = Lease(cfg).acquire()
print("held", lease.owner, flush=True)
while True:
    time.sleep(0.2)
    try:
        lease.check()
    except Exception as e:
        print(type(e).__name__, e, flush=True)
        sys.exit(3)
"""


def _holder(out: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, out], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line[:1] == ["held"], line
    return proc, line[1]


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    out = str(tmp_path / "out")
    proc, owner = _holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    caplog.set_level(logging.WARNING, "pipeline.lease")
    with Lease(_cfg(out, lease_wait_s=0)):  # no wait allowed: it must be taken over at once
        pass
    took = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert took == [f"output.path: took over the lease of {owner}: its process is gone (this machine, heartbeat 0 s ago)"]


def test_a_live_holder_on_this_machine_is_not_taken_over(tmp_path):
    out = str(tmp_path / "out")
    proc, owner = _holder(out)
    try:
        with pytest.raises(JobError) as e:
            Lease(_cfg(out, lease_wait_s=0)).acquire()
        assert f"({owner}, heartbeat " in str(e.value)
    finally:
        proc.kill()


def test_a_holder_elsewhere_that_stopped_beating_is_waited_for_then_taken_over(tmp_path, caplog):
    cfg = _cfg(str(tmp_path / "out"))  # lease_wait_s: the expiry (90 s)
    Path(lease_path(cfg)).write_bytes(_other_host(heartbeat_age=3, expiry_s=5))  # expires in 2 s
    caplog.set_level(logging.WARNING, "pipeline.lease")
    with Lease(cfg) as lease:
        assert _held(cfg)["run"] == lease.run
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("output.path: waiting for the lease of other-pod:7:beef (heartbeat 3 s ago, expires in 2 s)")
    assert said[-1].startswith("output.path: took over the expired lease of other-pod:7:beef (heartbeat ")


def test_a_holder_that_keeps_beating_is_refused_after_the_wait(tmp_path):
    cfg = _cfg(str(tmp_path / "out"), lease_expiry_s=5, lease_wait_s=3)
    holder = Lease(cfg).acquire()  # beats every 5/3 s: alive through the whole wait
    try:
        with pytest.raises(JobError) as e:
            Lease(cfg).acquire()
        message = str(e.value)
        assert message.startswith(f"output.path: another run is writing this output ({holder.owner}, heartbeat ")
        assert " s ago, still beating after 3 s of waiting); a second writer would duplicate rows." in message
        assert _held(cfg)["run"] == holder.run
    finally:
        holder.release()


def test_a_holder_paused_past_the_expiry_is_fenced_off(tmp_path):
    """SIGSTOP the holder past its expiry, take the lease over, SIGCONT it: its fence check
    fails (exit 3, LeaseLost) and its heartbeat does not overwrite the new holder's lease."""
    out = str(tmp_path / "out")
    proc, owner = _holder(out)
    proc.send_signal(signal.SIGSTOP)
    try:
        cfg = _cfg(out, lease_expiry_s=5)  # waits out the holder's 5 s expiry
        with Lease(cfg) as second:
            proc.send_signal(signal.SIGCONT)
            assert proc.wait(timeout=30) == 3
            said = proc.stdout.read().strip()
            assert said == (f"LeaseLost output.path: this run's lease {lease_path(cfg)} is now held by {second.owner}; "
                            "it stopped before writing another block")
            time.sleep(2)  # the old holder's heartbeat thread had time to run
            assert _held(cfg)["run"] == second.run
            second.check()
    finally:
        proc.kill()


def test_a_fenced_output_file_is_not_published(tmp_path):
    """The fence runs in the writer before a file appears under its name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.storage import arrow_fs

    cfg = _cfg(str(tmp_path / "out"), lease_wait_s=0)
    (tmp_path / "out").mkdir()
    lease = Lease(cfg).acquire()
    fs, path = arrow_fs(cfg.output.path, cfg.storage, fence=lease.fence())
    pq.write_table(pa.table({"id": [1]}), f"{path}/a.parquet", filesystem=fs)
    lease.release()
    other = Lease(cfg).acquire()  # another run holds it now
    try:
        with pytest.raises(LeaseLost):
            pq.write_table(pa.table({"id": [2]}), f"{path}/b.parquet", filesystem=fs)
    finally:
        other.release()  # its heartbeat thread stops with this test
    assert sorted(os.listdir(tmp_path / "out")) == ["a.parquet"]


@pytest.fixture()
def slow_s3(s3_endpoint):
    proxy = SlowProxy(s3_endpoint, put_delay_s=0.3)
    yield proxy
    proxy.close()


def test_s3_two_runs_started_together_never_both_hold_the_lease(slow_s3):
    """20 times, two runs race for one lease through a store whose PUTs take 300 ms more, the
    second starting 0 to 475 ms after the first: the conditional create lets exactly one win (the
    old write, sleep 0.2 s, read back check let both win in 4 of these 20 trials, measured). The
    trials race for 20 leases side by side: each pair is alone on its own output."""
    from concurrent.futures import ThreadPoolExecutor

    def trial(k: int) -> int:
        cfg = _cfg(f"s3://{BUCKET}/race-{k}/", storage=s3_storage(slow_s3.url), lease_wait_s=0)
        leases = [Lease(cfg), Lease(cfg)]  # each probes the store as it is made (two slow PUTs)
        assert all(lease.store.conditional for lease in leases)
        won, start = [], threading.Barrier(2)

        def race(lease, delay_s):
            start.wait()
            time.sleep(delay_s)
            try:
                won.append(lease.acquire())
            except JobError:
                pass

        threads = [threading.Thread(target=race, args=(lease, 0.025 * k * i)) for i, lease in enumerate(leases)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for lease in won:
            lease.release()
        return len(won)

    with ThreadPoolExecutor(20) as pool:
        assert list(pool.map(trial, range(20))) == [1] * 20  # per trial: how many held the lease
    assert slow_s3.puts >= 80  # the probes and the creates all went through the slow store


def test_s3_expired_lease_is_taken_over_with_if_match(s3_endpoint, caplog):
    cfg = _cfg(f"s3://{BUCKET}/expired/", storage=s3_storage(s3_endpoint), lease_wait_s=0)
    fs = s3_fs(s3_endpoint)
    fs.pipe(f"{BUCKET}/expired.lease", _other_host(heartbeat_age=1000))
    caplog.set_level(logging.WARNING, "pipeline.lease")
    with Lease(cfg) as lease:
        assert json.loads(fs.cat_file(f"{BUCKET}/expired.lease"))["run"] == lease.run
        lease.check()
    assert not fs.exists(f"{BUCKET}/expired.lease")
    assert any(r.getMessage().startswith("output.path: took over the expired lease of other-pod:7:beef") for r in caplog.records)


def test_an_s3_store_that_ignores_conditional_writes_is_said_at_start(s3_endpoint, caplog):
    proxy = SlowProxy(s3_endpoint, put_delay_s=0, strip_conditions=True)
    try:
        caplog.set_level(logging.WARNING, "pipeline.lease")
        lease = Lease(_cfg(f"s3://{BUCKET}/plain/", storage=s3_storage(proxy.url), lease_wait_s=0))
        assert not lease.store.conditional
        said = [r.getMessage() for r in caplog.records]
        assert said == ["output lease: this S3 store does not arbitrate conditional writes (it accepted a second "
                        "exclusive create of one object); falling back to write then read back, where two runs started "
                        "within one store round trip can both write the output"]
        with lease:
            assert json.loads(s3_fs(s3_endpoint).cat_file(f"{BUCKET}/plain.lease"))["run"] == lease.run
    finally:
        proxy.close()


def test_the_lease_names_this_machine(tmp_path):
    cfg = _cfg(str(tmp_path / "out"))
    with Lease(cfg) as lease:
        held = _held(cfg)
    assert (held["host"], held["pid"], held["run"]) == (socket.gethostname(), os.getpid(), lease.run)
    assert held["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
