"""Where the job writes, checked before anything is deleted, read or started.

The output and its checkpoint must not be the input, hold it, or lie inside it (an `overwrite`
would delete the input; a later run would read its own output back), whatever the spelling:
relative paths, symlinks and `s3a://` resolve first. And the location must be writable now, with
the credentials the job has: a missing bucket or a read-only folder is one line, not a traceback
after Ray has started.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlsplit

from .config import Config
from .errors import JobError, one_line
from .resume import checkpoint_path
from .storage import fsspec_fs

_MAGIC = "*?["


def location(url: str) -> tuple[str, str]:
    """(scheme, normalised path): local paths absolute with symlinks resolved, s3a -> s3."""
    parts = urlsplit(url)
    if len(parts.scheme) > 1:  # a URL (one letter would be a Windows drive)
        scheme = "s3" if parts.scheme in ("s3", "s3a") else parts.scheme
        return scheme, posixpath.normpath(f"{parts.netloc}/{parts.path.lstrip('/')}")
    return "file", os.path.realpath(os.path.abspath(os.path.expanduser(url)))


def _static_prefix(url: str) -> str:
    """A glob's folder before its first wildcard: the part every match lies inside."""
    cut = min((url.index(c) for c in _MAGIC if c in url), default=None)
    return url if cut is None else url[:cut].rsplit("/", 1)[0]


def _within(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    return inner[0] == outer[0] and (inner[1] == outer[1] or inner[1].startswith(outer[1].rstrip("/") + "/"))


_FORMAT_NAMES = {"parquet": "Parquet", "jsonl": "JSON Lines"}  # output.format -> what its files are


def check_no_overlap(cfg: Config, input_files: list[str]) -> None:
    """Refuse an output (or checkpoint) that equals, holds or lies inside an input."""
    inputs = [cfg.input.path] if isinstance(cfg.input.path, str) else list(cfg.input.path)
    scheme = lambda u: location(u)[0]  # noqa: E731
    given = [location(_static_prefix(u)) for u in inputs]
    # Expanded files carry no scheme: they share the input's filesystem.
    files = [location(f if scheme(inputs[0]) == "file" else f"{scheme(inputs[0])}://{f}") for f in input_files]
    for key, url in (("output.path", cfg.output.path), ("output.path (its checkpoint)", checkpoint_path(cfg))):
        out = location(url)
        for where in given + files:
            if _within(out, where) or _within(where, out):
                raise JobError(
                    f"{key}: {url} overlaps the input ({where[1]}); the job would read or delete its own input. "
                    "Write the output somewhere else"
                )


def check_writable(cfg: Config) -> None:
    """Create the output folder and write and remove a small file there, with the job's own
    credentials; any failure is one line naming the output and the cause (never a secret)."""
    url = cfg.output.path
    try:
        fs, path = fsspec_fs(url, cfg.storage)
        if location(url)[0] == "s3":
            bucket = path.split("/", 1)[0]
            try:
                fs.info(bucket)  # not exists(): that hides a credentials error as "missing"
            except FileNotFoundError:
                raise JobError(f"output.path: bucket {bucket!r} does not exist (or these credentials cannot see it)") from None
        elif fs.exists(path) and not fs.isdir(path):
            raise JobError(f"output.path: {url} is a file; the output is a folder of {_FORMAT_NAMES[cfg.output.format]} files")
        fs.makedirs(path, exist_ok=True)
        probe = posixpath.join(path, f".llava-ray-write-check-{uuid.uuid4().hex}")
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"output.path: cannot write to {url}: {one_line(e)}") from None
