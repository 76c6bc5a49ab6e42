"""Where input and output live: local paths, globs and s3:// through fsspec, as pyarrow filesystems."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.dataset as pads
from pyarrow.fs import FileSystem, FSSpecHandler, PyFileSystem

from .config import StorageConfig
from .images import storage_options

logger = logging.getLogger(__name__)


def fsspec_fs(url: str, storage: StorageConfig):
    """(fsspec filesystem, path without protocol) for a local path or a remote URL."""
    import fsspec

    opts: dict[str, Any] = storage_options(storage) if url.startswith(("s3://", "s3a://")) else {}
    return fsspec.core.url_to_fs(url, **opts)


def arrow_fs(url: str, storage: StorageConfig) -> tuple[FileSystem, str]:
    fs, path = fsspec_fs(url, storage)
    return PyFileSystem(FSSpecHandler(fs)), path


def input_files(paths: str | list[str], storage: StorageConfig) -> tuple[FileSystem, list[str]]:
    """Expand files, folders and globs to the Parquet files they name (sorted, deterministic)."""
    urls = [paths] if isinstance(paths, str) else list(paths)
    files: list[str] = []
    fs = None
    for url in urls:
        fs, path = fsspec_fs(url, storage)
        if any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
        elif fs.exists(path):
            found = [path]
        else:
            raise FileNotFoundError(f"input.path: {url} does not exist")
        if not found:
            raise FileNotFoundError(f"input.path: no Parquet files at {url}")
        files.extend(found)
    return PyFileSystem(FSSpecHandler(fs)), files


def parquet_dataset(files: list[str], fs: FileSystem) -> pads.Dataset:
    return pads.dataset(files, format="parquet", filesystem=fs)


def remove_tree(url: str, storage: StorageConfig) -> None:
    fs, path = fsspec_fs(url, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def output_rows(url: str, storage: StorageConfig, columns: list[str]):
    """The job's output so far as a pyarrow Table (empty when there is none yet)."""
    import pyarrow as pa

    fs, path = fsspec_fs(url, storage)
    if not fs.exists(path):
        return pa.table({c: [] for c in columns})
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not files:
        return pa.table({c: [] for c in columns})
    return parquet_dataset(files, PyFileSystem(FSSpecHandler(fs))).to_table(columns=columns)
