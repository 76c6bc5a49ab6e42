"""Shared fixtures: tiny checkpoints (built once per session), real photos, local Ray."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Keep Ray, HF and torch quiet and offline in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without credentials botocore would ask the cloud metadata address for some: tests talk to
# 127.0.0.1 only.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

ROOT = Path(__file__).resolve().parents[1]  # the repository


def _gpu_missing() -> str | None:
    """Why the `gpu` tests cannot run here, or None on a CUDA machine with vLLM."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (make test-gpu installs it)"
    return None


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA and vLLM are (make test-gpu) and skip elsewhere, saying why;
    `cpu_only` tests assert what a machine without a GPU answers, so they skip on a GPU one."""
    import torch

    missing = _gpu_missing()
    has_cuda = torch.cuda.is_available()
    for item in items:
        if missing and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {missing}"))
        if has_cuda and "cpu_only" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="expects a machine without a CUDA GPU"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test is a failed one (a test that cannot run proves nothing),
    except the `gpu` tests, which CI's machine has no GPU for."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and "gpu" not in item.keywords:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which runs every test but the gpu ones: {reason}"


def cli(*args, cwd=ROOT, timeout=240, env=None):
    """`llava-ray ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def in_a_fresh_process(code: str, *args: str) -> tuple[list[str], list[str]]:
    """`code` run by a new Python from the repository with `args` as sys.argv[1:]: the lines it
    printed, and the torch, torchvision and scipy modules it had imported by its end (for the
    processes that leave them out: pipeline.checkpoint.leave_out)."""
    report = ('\nimport json as _json, sys as _sys\nprint(_json.dumps(sorted(m for m in _sys.modules if m.split(".")[0] '
              'in ("torch", "torchvision", "scipy") and _sys.modules[m] is not None)))\n')
    res = subprocess.run([sys.executable, "-c", code + report, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "PyTorch" not in res.stderr, res.stderr  # transformers' notice is not the user's concern
    *printed, loaded = res.stdout.splitlines()
    return printed, json.loads(loaded)


def cli_here(*args) -> subprocess.CompletedProcess:
    """`llava-ray ARGS` in this process (`pipeline.cli.main`), for a test of what a command prints
    rather than of its process (`cli` runs those): a job joins the session's Ray (`ray_local`)
    instead of starting and stopping one of its own (~10 s a run on two cores)."""
    import contextlib
    import io
    import logging

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    progress = logging.getLogger("pipeline.progress")
    level = progress.level  # main() sets it for the process: given back for the tests after this one
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))  # from the repository, as `cli` runs it
    finally:
        progress.setLevel(level)
    return subprocess.CompletedProcess(["llava-ray", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    from pipeline.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", "llava"))


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory) -> str:
    from pipeline.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-next", "llava_next"))


def photo(name: str) -> np.ndarray:
    """A real photo shipped with scikit-image (astronaut, chelsea, coffee, rocket, camera, ...)."""
    from skimage import data

    return getattr(data, name)()


def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def resized(name: str, h: int, w: int, fmt: str = "JPEG") -> bytes:
    """A real photo at an exact size (to control aspect ratios), encoded."""
    img = Image.fromarray(photo(name)).convert("RGB").resize((w, h))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def ray_never_started(monkeypatch):
    """For a job refused at start: fails the test if the job reaches `init_ray` (the refusal came
    after Ray was started or joined). In-process, where `ray.is_initialized()` may be the session's."""
    from pipeline import job

    def refused(cfg):
        pytest.fail("the job reached init_ray: its refusal did not come before Ray starts")

    monkeypatch.setattr(job, "init_ray", refused)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, sized as the job sizes an embedded Ray (pipeline.cluster.local_cpus)."""
    import ray

    from pipeline.cluster import local_cpus
    from pipeline.config import load_config

    if ray.is_initialized():  # a Ray an earlier test's job left running, without these settings
        ray.shutdown()
    cpus = local_cpus(load_config({"model": {"name": "any"}}))
    # Metrics exported on a port of our own, as often as Ray allows (it floors the period at 1 s), so
    # tests can scrape them. address="local": our own Ray even while another runs here (a `ray
    # start`, the cluster tests' head), which a bare init would attach to and then refuse num_cpus.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=free_port(), _system_config={"metrics_report_interval_ms": 500})
    yield ray
    ray.shutdown()


def actor_ids(ray) -> set[str]:
    """Every actor this session's GCS knows, alive or dead: what a job started before this one left."""
    from ray._private.state import actors  # the GCS actor table; the public state API needs the dashboard

    return set(actors())


def own_model_actor(ray, earlier: set[str]) -> dict | None:
    """This driver's live model actor, as Ray's GCS records it (actor id, node, pid), leaving out
    the actors in `earlier` (an earlier job's, which Ray Data may not have stopped yet): never a
    process picked by name, which could belong to another Ray on the machine."""
    from ray._private.state import actors

    job = ray.get_runtime_context().get_job_id()
    node = ray.get_runtime_context().get_node_id()
    for actor_id, info in actors().items():
        if (actor_id not in earlier and info["JobID"] == job and info["State"] == "ALIVE"
                and "GenerateStage" in info["ActorClassName"] and info["Address"]["NodeID"] == node):
            return {"actor_id": actor_id, "pid": info["Pid"]}
    return None


def with_model_actor_paused(ray, run, during):
    """`run()`, a job on the session's Ray, with `during()` done while that job's model actor is
    paused (SIGSTOP): the job holds its lease and cannot finish meanwhile, whatever the timing.
    Returns both results."""
    import signal
    import threading
    import time

    finished, box, earlier = threading.Event(), {}, actor_ids(ray)

    def pause():
        deadline = time.monotonic() + 180
        while not finished.is_set() and time.monotonic() < deadline:
            if actor := own_model_actor(ray, earlier):
                os.kill(actor["pid"], signal.SIGSTOP)
                try:
                    box["during"] = during()
                except BaseException as e:  # raised in the test's thread below
                    box["error"] = e
                finally:
                    os.kill(actor["pid"], signal.SIGCONT)
                return
            time.sleep(0.05)

    pauser = threading.Thread(target=pause)
    pauser.start()
    try:
        result = run()
    finally:
        finished.set()
        pauser.join()
    if "error" in box:
        raise box["error"]
    assert "during" in box, "the job finished before its model actor was paused"
    return result, box["during"]


KEY, SECRET, BUCKET = "testing-key", "testing-secret", "llava"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint: moto in server mode on 127.0.0.1, with the bucket BUCKET."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


def s3_storage(url: str) -> dict:
    """The `storage` config section for the moto endpoint at `url`."""
    return {"endpoint_url": url, "region": "us-east-1", "key": KEY, "secret": SECRET}


def s3_fs(url: str):
    import s3fs

    return s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": url, "region_name": "us-east-1"})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def metrics_url(ray_local) -> str:
    """This session's Ray's Prometheus endpoint."""
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    return f"http://127.0.0.1:{port}/metrics"


def small_job(ckpt: str, tmp_path: Path, n: int = 6, ids: list | None = None, **output):
    """A job over `n` small photos (ids r0, r1, ... or `ids`) in 2-row blocks, 4 new tokens, its
    YAML written as `tmp_path/job.yaml`; `output`: settings of its output. -> (YAML path, Config)."""
    import yaml

    from pipeline.config import load_config

    ids = ids or [f"r{i}" for i in range(n)]
    rows = [{"id": i, "image": resized("coffee", 100 + k, 120), "prompt": f"Row {k}?"} for k, i in enumerate(ids)]
    data = {
        "model": {"name": ckpt}, "generation": {"max_new_tokens": 4},
        "input": {"path": write_parquet(tmp_path / f"in-{type(ids[0]).__name__}.parquet", rows)},
        "output": {"path": str(tmp_path / "out"), **output},
        "resources": {"rows_per_block": 2, "model_batch_size": 2, "preprocess_batch_size": 2},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, load_config(data)


@pytest.fixture(scope="session")
def finished(ray_local, tiny_llava, tmp_path_factory) -> Path:
    """A finished 6-row `small_job`'s folder (input, `out`, `out.checkpoint`), run once for the
    tests that start from a finished output (test_exactly_once.py, test_resume.py, test_s3.py);
    each works on a copy (`finished_copy`)."""
    from pipeline.job import run_job

    tmp = tmp_path_factory.mktemp("finished")
    _, cfg = small_job(tiny_llava, tmp)
    assert run_job(cfg).rows_ok == 6
    return tmp


def finished_copy(finished: Path, ckpt: str, tmp_path: Path, **output):
    """`finished`'s output and checkpoint copied under `tmp_path`, beside the same input written
    there anew: the Config of that job (`output`: settings of its output)."""
    import shutil

    for name in ("out", "out.checkpoint"):
        shutil.copytree(finished / name, tmp_path / name)
    return small_job(ckpt, tmp_path, **output)[1]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text over HTTP, parsed by prometheus_client: {(sample name, labels): value},
    summed over Ray's per-process labels (worker, component, ...)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    keep = {"status", "kind", "stage", "stream", "le"}
    out: dict[tuple[str, tuple], float] = {}
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "llava_ray" not in sample.name:
                continue
            key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k in keep)))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def settled(metrics_url: str, done=None) -> dict:
    """Scrape until `done(samples)` holds, or (no `done`) until two scrapes two seconds apart agree
    on llava-ray's own samples (Ray's own move for reasons of their own): Ray exports every
    second, so what was just counted may not be exported yet."""
    import time

    ours = lambda samples: {k: v for k, v in samples.items() if k[0].startswith("ray_llava_ray_")}  # noqa: E731
    deadline = time.monotonic() + 30
    last = None
    while True:
        samples = scrape(metrics_url)
        if (done(samples) if done else ours(samples) == last) or time.monotonic() > deadline:
            return samples
        last = ours(samples)
        time.sleep(0.25 if done else 2.0)


def grown(before: dict, counts: dict[str, float]):
    """A `settled` condition: each named sample grew by at least its count since `before`. Ray
    exports each metric apart, so a check waits for every count it then asserts exactly."""
    return lambda samples: all(value(samples, name) - value(before, name) >= n for name, n in counts.items())


def value(samples: dict, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    want = set((k, str(v)) for k, v in labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@dataclass(frozen=True)
class Reference:
    """What transformers gives for one row, and what the model was given."""

    text: str
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    input_ids: tuple[int, ...]


def reference(ckpt: str, images: list[bytes], prompt: str | None = None, max_new_tokens: int = 12, *,
              conversation: list[dict] | None = None, quantization_config=None, dtype=None) -> Reference:
    """transformers called directly, as on the model card: the checkpoint's processor, its chat
    template and model.generate, greedy, one row at a time (independent of pipeline code).
    `conversation` (HF chat format) instead of `prompt` for multi-turn or system prompts; `dtype`:
    the model loaded in it (a torch dtype) and its pixel values cast to it."""
    import transformers as tf
    from transformers import AutoConfig

    key = (ckpt, repr(quantization_config), dtype)
    model = _REF_MODELS.get(key)
    if model is None:
        config = AutoConfig.from_pretrained(ckpt)
        cls = {"llava": tf.LlavaForConditionalGeneration, "llava_next": tf.LlavaNextForConditionalGeneration}[config.model_type]
        model = _REF_MODELS[key] = cls.from_pretrained(ckpt, quantization_config=quantization_config, dtype=dtype)
    processor = tf.AutoProcessor.from_pretrained(ckpt)
    pil = [Image.open(io.BytesIO(b)) for b in images]
    if conversation is None:
        conversation = [{"role": "user", "content": [{"type": "image"} for _ in pil] + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=pil, text=text, return_tensors="pt")
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    ids = inputs["input_ids"][0].tolist()
    return Reference(
        text=processor.decode(new, skip_special_tokens=True),
        prompt_tokens=len(ids),
        image_tokens=ids.count(model.config.image_token_index),
        completion_tokens=len(new),
        input_ids=tuple(ids),
    )


_REF_MODELS: dict = {}


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height: a decompression bomb's signature."""
    import struct
    import zlib

    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pil_error(data: bytes) -> str:
    """PIL's own error for undecodable bytes, computed apart from the pipeline."""
    try:
        Image.open(io.BytesIO(data)).load()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError("the bytes decode")


def write_parquet(path, rows: list[dict], schema=None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def read_output(path) -> dict:
    """Output Parquet folder -> {id: row}; asserts ids are unique."""
    import pyarrow.dataset as pads

    rows = pads.dataset(str(path), format="parquet").to_table().to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate ids in the output"
    return by_id


def preprocessor(cfg, **kwargs):
    """A Preprocessor over the checkpoint `cfg` names, opened once as the stages open it."""
    from pipeline.checkpoint import Checkpoint
    from pipeline.preprocess import Preprocessor

    return Preprocessor(cfg, Checkpoint.load(cfg.model), **kwargs)


def hf_engine(cfg):
    from pipeline.checkpoint import Checkpoint
    from pipeline.engines.hf import HFEngine

    return HFEngine(cfg, Checkpoint.load(cfg.model))
