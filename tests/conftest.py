"""Shared fixtures: tiny checkpoints (built once per session), real photos, local Ray."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Keep Ray, HF and torch quiet and offline in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]  # the repository


def cli(*args, cwd=ROOT, timeout=240, env=None):
    """`llava-ray ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, sized as the job sizes an embedded Ray (pipeline.job.local_cpus)."""
    import ray

    from pipeline.config import load_config
    from pipeline.job import local_cpus

    if not ray.is_initialized():
        cpus = local_cpus(load_config({"model": {"name": "any"}}))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def reference_text(ckpt: str, images: list[bytes], prompt: str, max_new_tokens: int) -> str:
    """What transformers gives when called directly, as on the model card: the checkpoint's
    processor + model.generate, greedy, one row at a time (independent of pipeline code)."""
    import transformers as tf
    from transformers import AutoConfig

    model_cls = {"llava": tf.LlavaForConditionalGeneration, "llava_next": tf.LlavaNextForConditionalGeneration}
    model = _REF_MODELS.get(ckpt)
    if model is None:
        model = _REF_MODELS[ckpt] = model_cls[AutoConfig.from_pretrained(ckpt).model_type].from_pretrained(ckpt)
    processor = tf.AutoProcessor.from_pretrained(ckpt)
    pil = [Image.open(io.BytesIO(b)) for b in images]
    conversation = [{"role": "user", "content": [{"type": "image"} for _ in pil] + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=pil, text=text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


_REF_MODELS: dict = {}


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
