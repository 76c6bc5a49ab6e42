"""`llava-ray demo`: real photos from scikit-image plus one broken image, through the real job."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PHOTOS = {
    "astronaut": "What is the person wearing?",
    "chelsea": None,  # no prompt: the job's default (captioning) prompt
    "coffee": "What drink is this?",
    "rocket": None,
    "page": "What does the text say?",
    "hubble_deep_field": "Describe the scene.",
}


def _png(name: str) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buf, "PNG")
    return buf.getvalue()


def write_demo_input(path: str | Path) -> Path:
    """Write the demo's input Parquet: one row per photo, and a truncated PNG that must fail."""
    rows = [{"id": name, "image": _png(name), "prompt": prompt} for name, prompt in PHOTOS.items()]
    rows.append({"id": "broken", "image": _png("camera")[:200], "prompt": None})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path
