"""S3 in and out against a real S3 HTTP endpoint (moto in server mode on 127.0.0.1), and a
corpus of bad inputs: the job finishes, good rows are answered, each bad row names its cause."""

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.job import run_job
from tests.conftest import (
    BUCKET,
    KEY,
    SECRET,
    encode,
    photo,
    pil_error,
    png_claiming,
    read_output,
    reference,
    resized,
    s3_fs,
    s3_storage,
    small_job,
    write_parquet,
)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _credentials_read_afresh():
    """fsspec reuses one filesystem per set of arguments, and s3fs reads the environment's
    credentials when it makes one: tests that change the AWS variables get filesystems of their own."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def _storage(url):
    return s3_storage(url)


def _fs(url):
    return s3_fs(url)


def _cfg(ckpt, inp, out, **extra):
    return load_config({
        "model": {"name": ckpt}, "generation": {"max_new_tokens": 10},
        "input": {"path": inp}, "output": {"path": out, "mode": "overwrite"},
        "resources": {"rows_per_block": 4, "model_batch_size": 4}, **extra,
    })


def test_s3_round_trip_equals_transformers(ray_local, tiny_llava, s3_endpoint, tmp_path):
    """Parquet and images read from S3, the output and its checkpoint written there: each answer
    equals transformers on the same image bytes and prompt."""
    fs = _fs(s3_endpoint)
    photos = {name: encode(photo(name), "JPEG") for name in ["astronaut", "chelsea", "coffee", "rocket", "camera"]}
    rows = []
    for i, (name, data) in enumerate(photos.items()):
        fs.pipe(f"{BUCKET}/images/{name}.jpg", data)
        rows.append({"id": i, "image_path": f"s3://{BUCKET}/images/{name}.jpg", "prompt": f"What is {name}?"})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    fs.pipe(f"{BUCKET}/in/part-0.parquet", buf.getvalue())

    cfg = _cfg(tiny_llava, f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out/", storage=_storage(s3_endpoint))
    summary = run_job(cfg)
    assert (summary.rows_total, summary.rows_ok) == (5, 5)
    files = [f for f in fs.find(f"{BUCKET}/out") if f.endswith(".parquet")]
    out = {r["id"]: r for f in files for r in pq.read_table(fs.open(f, "rb")).to_pylist()}
    assert fs.find(f"{BUCKET}/out.checkpoint"), "the checkpoint lives beside the output, on S3 too"
    assert set(out) == set(range(5))
    for i, (name, data) in enumerate(photos.items()):
        ref = reference(tiny_llava, [data], f"What is {name}?", cfg.generation.max_new_tokens)
        assert (out[i]["error"], out[i]["text"], out[i]["prompt_tokens"], out[i]["completion_tokens"]) == (
            None, ref.text, ref.prompt_tokens, ref.completion_tokens), name


def _special_images() -> dict[str, bytes]:
    rgb = photo("coffee")
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    png16 = io.BytesIO()
    Image.fromarray((photo("camera").astype(np.uint16) * 257)).save(png16, "PNG")
    palette = io.BytesIO()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(palette, "PNG", transparency=0)
    gif = io.BytesIO()
    frames = [Image.fromarray(photo(n)).resize((64, 48)) for n in ("chelsea", "coffee")]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {"cmyk": cmyk.getvalue(), "png16": png16.getvalue(), "palette": palette.getvalue(), "gif": gif.getvalue(),
            "one_px": encode(np.full((1, 1, 3), 200, np.uint8))}


def test_bad_input_corpus(ray_local, tiny_llava, s3_endpoint, tmp_path):
    fs = _fs(s3_endpoint)
    good = {"good1": resized("astronaut", 300, 300), "good2": resized("rocket", 200, 400)}
    usable = _special_images()  # unusual but valid: converted to RGB and answered
    truncated = encode(photo("coffee"), "JPEG")[:2000]
    bad_bytes = {
        "truncated_jpeg": (truncated, f"image: truncated or corrupt JPEG data: {pil_error(truncated)}"),
        "zero_bytes": (b"", "image: empty (0 bytes)"),
        "random_bytes": (np.random.default_rng(0).bytes(4096), "image: cannot identify image file"),
        "text": (b"hello, I am not an image\n" * 10, "image: cannot identify image file"),
        "thin_1x20000": (encode(np.zeros((20000, 1, 3), np.uint8)), "image: 1x20000 aspect ratio exceeds limits.max_aspect_ratio=50"),
        "bomb": (png_claiming(40000, 40000), "image: 40000x40000 exceeds limits.max_pixels=40000000"),
    }
    for name, data in {**good, **usable}.items():
        fs.pipe(f"{BUCKET}/corpus/{name}.img", data)
    rows = [{"id": k, "image": None, "image_path": f"s3://{BUCKET}/corpus/{k}.img"} for k in {**good, **usable}]
    rows += [{"id": k, "image": v, "image_path": None} for k, (v, _) in bad_bytes.items()]
    rows += [
        {"id": "missing_s3_key", "image": None, "image_path": f"s3://{BUCKET}/corpus/nope.jpg"},
        {"id": "unreachable_url", "image": None, "image_path": "http://127.0.0.1:9/x.jpg"},
        {"id": "http_disabled_host", "image": None, "image_path": "http://169.254.169.254/latest/meta-data/"},
    ]
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("image_path", pa.string())])
    cfg = _cfg(
        tiny_llava, write_parquet(tmp_path / "in.parquet", rows, schema), str(tmp_path / "out"),
        storage=_storage(s3_endpoint),
        fetch={"allow_http": True, "allowed_private_hosts": ["127.0.0.1"], "retries": 1, "timeout_s": 2},
    )
    summary = run_job(cfg)
    out = read_output(cfg.output.path)
    assert set(out) == {r["id"] for r in rows} and summary.rows_total == len(rows)
    for k in [*good, *usable]:
        assert out[k]["error"] is None and out[k]["text"] is not None, (k, out[k]["error"])
    for k, (_, message) in bad_bytes.items():
        assert out[k]["error"] == message, (k, out[k]["error"])
        assert out[k]["text"] is None
    assert out["missing_s3_key"]["error"] == f"image: not found: s3://{BUCKET}/corpus/nope.jpg"
    assert out["unreachable_url"]["error"] == (
        "image: cannot connect to 127.0.0.1:9: [Errno 111] Connection refused (after 2 attempts)"
    )
    assert out["http_disabled_host"]["error"] == (
        "image: refused 169.254.169.254 (169.254.169.254): link-local (cloud metadata) addresses are not fetched; "
        "list the host in fetch.allowed_private_hosts to allow it"
    )
    assert summary.rows_failed == len(bad_bytes) + 3


def _no_credentials(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))


def test_s3_outputs_that_cannot_work_are_one_line_before_ray(tiny_llava, s3_endpoint, tmp_path, monkeypatch, ray_never_started):
    from pipeline.errors import JobError

    inp = write_parquet(tmp_path / "in.parquet", [{"id": 1, "image": resized("coffee", 64, 64)}])
    with pytest.raises(JobError) as e:
        run_job(_cfg(tiny_llava, inp, "s3://no-such-bucket/out/", storage=_storage(s3_endpoint)))
    assert str(e.value) == "output.path: bucket 'no-such-bucket' does not exist (or these credentials cannot see it)"

    _no_credentials(monkeypatch, tmp_path)
    with pytest.raises(JobError) as e:
        run_job(_cfg(tiny_llava, inp, f"s3://{BUCKET}/out-nocreds/", storage={"endpoint_url": s3_endpoint, "region": "us-east-1"}))
    assert str(e.value) == f"output.path: cannot write to s3://{BUCKET}/out-nocreds/: NoCredentialsError: Unable to locate credentials"
    assert KEY not in str(e.value) and SECRET not in str(e.value)


def test_a_live_lease_on_s3_refuses_a_second_writer(tiny_llava, s3_endpoint, tmp_path):
    import json
    import time

    from pipeline.errors import JobError

    inp = write_parquet(tmp_path / "in.parquet", [{"id": 1, "image": resized("coffee", 64, 64)}])
    _fs(s3_endpoint).pipe(f"{BUCKET}/leased.lease", json.dumps({"owner": "other-pod:7:beef", "heartbeat": time.time(), "expiry_s": 90}).encode())
    cfg = _cfg(tiny_llava, inp, f"s3://{BUCKET}/leased", storage=_storage(s3_endpoint))
    cfg.output.lease_wait_s = 0
    with pytest.raises(JobError) as e:
        run_job(cfg)
    assert re.match(r"output\.path: another run is writing this output \(other-pod:7:beef, heartbeat \d+ s ago\); ", str(e.value))


def test_s3_images_that_cannot_be_read_name_the_url(tiny_llava, s3_endpoint, tmp_path, monkeypatch):
    """Through the CPU stage as a plain callable, in this process (its environment has no
    credentials): the cause is an `image:` error naming the URL, never a catch-all."""
    import pyarrow as pa

    from pipeline.stages import PreprocessStage

    def errors(storage):
        cfg = {"model": {"name": tiny_llava}, "input": {"path": "unused"}, "storage": storage}
        rows = pa.table({"id": [1, 2], "image_path": ["s3://no-such-bucket/x.jpg", f"s3://{BUCKET}/corpus/good1.img"]})
        return PreprocessStage(cfg)(rows).column("error").to_pylist()

    _fs(s3_endpoint).pipe(f"{BUCKET}/corpus/good1.img", resized("astronaut", 300, 300))
    missing, ok = errors(_storage(s3_endpoint))
    assert (missing, ok) == ("image: not found: s3://no-such-bucket/x.jpg", None)
    _no_credentials(monkeypatch, tmp_path)
    a, b = errors({"endpoint_url": s3_endpoint, "region": "us-east-1"})
    assert a == "image: cannot read s3://no-such-bucket/x.jpg: NoCredentialsError: Unable to locate credentials"
    assert b == f"image: cannot read s3://{BUCKET}/corpus/good1.img: NoCredentialsError: Unable to locate credentials"


def test_credentials_come_from_the_aws_environment_variables(tiny_llava, s3_endpoint, tmp_path, monkeypatch):
    """`storage` without key and secret (a RayJob's Secret sets the variables): images are read
    and the output is writable with the standard AWS variables' credentials."""
    from pipeline.outputs import check_writable
    from pipeline.stages import PreprocessStage

    _fs(s3_endpoint).pipe(f"{BUCKET}/corpus/env.img", resized("rocket", 120, 160))
    _no_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    storage = {"endpoint_url": s3_endpoint, "region": "us-east-1"}
    cfg = {"model": {"name": tiny_llava}, "input": {"path": "unused"}, "output": {"path": f"s3://{BUCKET}/env-out/"}, "storage": storage}
    prepared = PreprocessStage(cfg)(pa.table({"id": [1], "image_path": [f"s3://{BUCKET}/corpus/env.img"]}))
    assert (prepared.column("error").to_pylist(), prepared.column("_image_sizes").to_pylist()) == ([None], [[120, 160]])
    check_writable(load_config(cfg))  # the start-up check writes and removes a probe there


def test_hand_damaged_s3_output_and_checkpoint_are_reconciled(ray_local, tiny_llava, finished, s3_endpoint, tmp_path):
    """As on local disk (tests/pipeline/test_exactly_once.py), on S3: the output is the truth. It
    starts from the session's finished 6-row job (conftest.finished), its output and checkpoint
    put on S3 as that job would have written them there."""
    fs = _fs(s3_endpoint)
    for name, key in (("out", "damaged"), ("out.checkpoint", "damaged.checkpoint")):
        fs.put(f"{finished / name}/", f"{BUCKET}/{key}/", recursive=True)
    path, _ = small_job(tiny_llava, tmp_path)  # the same input, written anew
    cfg = load_config(yaml.safe_load(path.read_text()) | {"output": {"path": f"s3://{BUCKET}/damaged/"}, "storage": _storage(s3_endpoint)})
    out_rows = lambda: sum(pq.read_metadata(fs.open(f, "rb")).num_rows for f in fs.find(f"{BUCKET}/damaged") if f.endswith(".parquet"))  # noqa: E731
    assert out_rows() == 6 and run_job(cfg).rows_processed == 0  # finished: nothing to run
    fs.rm(f"{BUCKET}/damaged.checkpoint", recursive=True)  # checkpoint gone: nothing may run twice
    assert run_job(cfg).rows_processed == 0 and out_rows() == 6
    first = sorted(f for f in fs.find(f"{BUCKET}/damaged") if f.endswith(".parquet"))[0]
    lost = pq.read_metadata(fs.open(first, "rb")).num_rows
    fs.rm(first)  # one data file gone: exactly its rows again
    assert run_job(cfg).rows_processed == lost and out_rows() == 6
    assert not fs.exists(f"{BUCKET}/damaged.lease")  # released


def test_two_runs_on_one_s3_output_one_proceeds(ray_local, tiny_llava, s3_endpoint, tmp_path):
    """`llava-ray run` on an S3 output a running job holds (a job on the session's Ray, its model
    actor paused meanwhile so it cannot finish first) is refused in one line; the first
    finishes, every row once."""
    import json
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT, with_model_actor_paused

    rows = [{"id": f"r{i}", "image": resized("coffee", 100 + i, 120), "prompt": f"Row {i}?"} for i in range(16)]
    data = {
        "model": {"name": tiny_llava}, "generation": {"max_new_tokens": 4},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows)}, "output": {"path": f"s3://{BUCKET}/twice/"},
        "resources": {"rows_per_block": 2, "model_batch_size": 2}, "storage": _storage(s3_endpoint),
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    fs = _fs(s3_endpoint)

    def second():
        fs.invalidate_cache()
        holder = json.loads(fs.cat_file(f"{BUCKET}/twice.lease"))["owner"]
        run = [sys.executable, "-m", "pipeline", "run", str(tmp_path / "job.yaml"), "--set", "output.lease_wait_s=0"]
        return holder, subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=240)

    summary, (holder, refused) = with_model_actor_paused(ray_local, lambda: run_job(load_config(data)), second)
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith(f"error: output.path: another run is writing this output ({holder}, heartbeat ")
    assert summary.rows_processed == 16
    files = [f for f in fs.find(f"{BUCKET}/twice") if f.endswith(".parquet")]
    ids = [i for f in files for i in pq.read_table(fs.open(f, "rb")).column("id").to_pylist()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(16))  # every row exactly once


def test_a_killed_s3_job_rerun_at_once_resumes(ray_local, tiny_llava, s3_endpoint, tmp_path):
    """SIGKILL of the job's driver (attached to the session's Ray, as a RayJob's is) once output
    exists on S3, then an immediate rerun (no wait allowed): it takes over the dead holder's
    lease, runs only the missing rows, each once."""
    import yaml

    from tests.pipeline.test_resume import _kill_attached, _start_job, hold_mid_job, raylet_pid

    n = 48
    rows = [{"id": f"r{i}", "image": resized("coffee", 100 + i, 120), "prompt": f"Row {i}?"} for i in range(n)]
    data = {
        "model": {"name": tiny_llava}, "generation": {"max_new_tokens": 24},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows)}, "output": {"path": f"s3://{BUCKET}/killed/"},
        "resources": {"rows_per_block": 4, "model_batch_size": 4, "preprocess_batch_size": 4}, "storage": _storage(s3_endpoint),
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    fs = _fs(s3_endpoint)
    def done():
        fs.invalidate_cache()  # the test's own s3fs keeps listings: see the job's writes as they land
        return [f for f in fs.find(f"{BUCKET}/killed") if f.endswith(".parquet")]

    def committed() -> set:  # ids of blocks whose checkpoint is committed (a pending block runs again)
        fs.invalidate_cache()
        found = fs.find(f"{BUCKET}/killed.checkpoint") if fs.exists(f"{BUCKET}/killed.checkpoint") else []
        files = [f for f in found if f.endswith(".parquet") and not f.endswith(".pending.parquet")]
        return {i for f in files for i in pq.read_table(fs.open(f, "rb")).column("id").to_pylist()}

    proc, _ = hold_mid_job(lambda: _start_job(tmp_path / "job.yaml", ray_local), lambda: len(committed()), 1, raylet_pid())
    _kill_attached(proc, ray_local)
    assert fs.exists(f"{BUCKET}/killed.lease")  # the dead run's lease is still there
    written = committed()
    assert 0 < len(written) < n, "the stop should land mid-job"

    cfg = load_config({**data, "output": {**data["output"], "lease_wait_s": 0}})
    summary = run_job(cfg)
    ids = [i for f in done() for i in pq.read_table(fs.open(f, "rb")).column("id").to_pylist()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # every row exactly once
    assert summary.rows_processed == n - len(written)  # only the missing rows


def test_s3_inputs_that_cannot_be_read_are_one_line_before_ray(tiny_llava, s3_endpoint, tmp_path, monkeypatch, ray_never_started):
    from pipeline.errors import JobError

    _fs(s3_endpoint).pipe(f"{BUCKET}/readable/in.parquet", open(write_parquet(tmp_path / "in.parquet", [{"id": 1, "image": b"x"}]), "rb").read())
    out = str(tmp_path / "out")
    with pytest.raises(JobError) as e:
        run_job(_cfg(tiny_llava, "s3://no-such-bucket/in.parquet", out, storage=_storage(s3_endpoint)))
    assert str(e.value) == "input.path: s3://no-such-bucket/in.parquet does not exist"
    _no_credentials(monkeypatch, tmp_path)
    with pytest.raises(JobError) as e:
        run_job(_cfg(tiny_llava, f"s3://{BUCKET}/readable/in.parquet", out, storage={"endpoint_url": s3_endpoint, "region": "us-east-1"}))
    assert str(e.value) == f"input.path: cannot read s3://{BUCKET}/readable/in.parquet: NoCredentialsError: Unable to locate credentials"
