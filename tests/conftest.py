"""Shared fixtures: tiny checkpoints (built once per session), real photos, local Ray."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

# Keep Ray, HF and torch quiet and offline in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    """One local Ray for the session, 2 CPUs like CI."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
