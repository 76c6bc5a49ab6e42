"""`_manifest.json` in the output folder: one entry per run, what ran and what it wrote.

Parquet readers skip `_` files, so the manifest sits beside the data without being read as data.
It is written last, atomically, from the same tally as the summary, so its counts equal the
output's. Secrets never reach it: every key the config marks secret is replaced.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
from importlib import metadata
from pathlib import Path

from .checkpoint import Checkpoint
from .config import SECRETS, Config
from .progress import Tally
from .storage import FenceCheck, fsspec_fs, open_atomic

NAME = "_manifest.json"
_PACKAGES = ("llava-ray", "ray", "transformers", "torch", "vllm")


def redacted(cfg: Config) -> dict:
    data = cfg.model_dump(mode="json")
    for section, keys in SECRETS.items():
        for key in keys:
            if data.get(section, {}).get(key) is not None:
                data[section][key] = "<redacted>"
    return data


def checkpoint_id(checkpoint: Checkpoint) -> str:
    """A local checkpoint: sha256 over its file names, sizes and config.json; a hub id: its revision."""
    root = Path(checkpoint.path)
    if not root.is_dir():
        return f"{checkpoint.path}@{checkpoint.revision or 'main'}"
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root)}:{f.stat().st_size}\n".encode())
    h.update((root / "config.json").read_bytes())
    return f"sha256:{h.hexdigest()}"


def versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def entry(cfg: Config, checkpoint: Checkpoint, started: dt.datetime, seconds: float, whole: Tally, run: Tally,
          backend: str | None) -> dict:
    return {
        "started_at": started.isoformat(timespec="seconds"),
        "ended_at": (started + dt.timedelta(seconds=seconds)).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "config": redacted(cfg),
        "model": {"name": cfg.model.name, "path": checkpoint.path, "checkpoint": checkpoint_id(checkpoint)},
        "backend": backend,
        "versions": versions(),
        "rows": {"total": whole.rows, "ok": whole.ok, "failed": whole.failed, "processed_this_run": run.rows,
                 "ok_this_run": run.ok, "failed_this_run": run.failed},
        "failures_by_kind": dict(sorted(whole.by_kind.items())),
        "tokens_this_run": {"prompt": run.prompt_tokens, "image": run.image_tokens, "generated": run.generated_tokens},
        "files_written": [posixpath.basename(f) for f in run.files],
    }


def append(cfg: Config, record: dict, fence: FenceCheck = None) -> str:
    """Append `record` to the output's manifest (a JSON list), replacing the file atomically
    (with the lease's `fence`: only while this run still holds the output)."""
    fs, root = fsspec_fs(cfg.output.path, cfg.storage)
    path = posixpath.join(root, NAME)
    entries = json.loads(fs.cat_file(path)) if fs.exists(path) else []
    entries.append(record)
    fs.makedirs(root, exist_ok=True)
    with open_atomic(fs, path, fence) as f:
        f.write(json.dumps(entries, indent=1).encode())
    return path
