"""Where input and output live: local paths, globs and s3:// through fsspec, as pyarrow filesystems."""

from __future__ import annotations

import logging
import posixpath
import sys
from typing import Any

import pyarrow.dataset as pads
from pyarrow import PythonFile
from pyarrow.fs import FileSystem, FSSpecHandler, PyFileSystem

from .config import StorageConfig
from .errors import JobError

logger = logging.getLogger(__name__)


def storage_options(storage: StorageConfig, timeout_s: float | None = None) -> dict[str, Any]:
    """s3fs options from the config; credentials absent here come from the AWS environment.
    `timeout_s` bounds each connect and read (botocore's own timeouts; image reads use it)."""
    # No listings cache: Ray reuses worker processes (and fsspec reuses filesystem instances), so
    # a cached listing would outlive the files it lists -- a rerun would miss a checkpoint written
    # since, or read one that was deleted.
    opts: dict[str, Any] = {"anon": storage.anonymous, "use_listings_cache": False}
    if timeout_s is not None:
        opts["config_kwargs"] = {"connect_timeout": timeout_s, "read_timeout": timeout_s, "retries": {"max_attempts": 2}}
    if storage.key and storage.secret:
        opts.update(key=storage.key, secret=storage.secret)
    client: dict[str, Any] = {}
    if storage.endpoint_url:
        client["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client["region_name"] = storage.region
    if client:
        opts["client_kwargs"] = client
    return opts


def fsspec_fs(url: str, storage: StorageConfig):
    """(fsspec filesystem, path without protocol) for a local path or a remote URL."""
    import fsspec

    opts: dict[str, Any] = storage_options(storage) if url.startswith(("s3://", "s3a://")) else {}
    return fsspec.core.url_to_fs(url, **opts)


class open_atomic:
    """A file written under a hidden name and renamed into place only after a clean close, so a
    reader never sees a partial file. A write or close that fails, or an error inside the `with`
    block, removes the hidden file instead: nothing appears under the real name.

    pyarrow's streams (`NativeFile.__exit__`, `ParquetWriter.__exit__`) close whether their block
    raised or not, so `close` itself looks for an exception being handled that was not already in
    flight when the file was opened: a close during the unwinding of its own write discards."""

    def __init__(self, fs, path: str):
        head, tail = posixpath.split(path)
        self.fs, self.path, self.tmp = fs, path, posixpath.join(head, f".{tail}.inprogress")
        self.f = fs.open(self.tmp, "wb")
        self.failed = False
        self._in_flight = sys.exc_info()[1]  # an error already being handled is not this write's

    def __getattr__(self, name):
        return getattr(self.f, name)

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except BaseException:  # disk full, I/O error: what was written is not the whole file
            self.failed = True
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except BaseException:
            self.failed = True
            raise

    @property
    def closed(self) -> bool:
        return self.f.closed

    def close(self) -> None:
        """Publish the file, unless something failed on the way (then discard it)."""
        if self.f.closed:
            return
        unwinding = sys.exc_info()[1]
        if self.failed or (unwinding is not None and unwinding is not self._in_flight):
            logger.warning("not publishing %s: its write did not complete", self.path)
            return self.discard()
        try:
            self.f.close()
        except BaseException:
            self.discard()
            raise
        self.fs.mv(self.tmp, self.path)

    def discard(self) -> None:
        """Drop the hidden file; nothing is published."""
        self.failed = True
        try:
            if not self.f.closed:
                self.f.close()
        except Exception:  # closing may fail for the same reason the write did
            logger.debug("closing %s failed", self.tmp, exc_info=True)
        if self.fs.exists(self.tmp):
            self.fs.rm(self.tmp)

    def __del__(self) -> None:
        # Dropped unclosed: a writer that failed without closing (pyarrow's dataset writer does).
        try:
            if not self.f.closed:
                self.discard()
        except Exception:
            pass

    def __enter__(self) -> "open_atomic":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


class AtomicWriteHandler(FSSpecHandler):
    """Local and network file systems show a half-written file to readers while it is written,
    and leave it there if the job is killed; object stores publish an object only when its
    upload completes. Here too, a file appears under its name only once it is complete."""

    def open_output_stream(self, path, metadata):
        return PythonFile(open_atomic(self.fs, path), mode="w")


def arrow_fs(url: str, storage: StorageConfig) -> tuple[FileSystem, str]:
    fs, path = fsspec_fs(url, storage)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return PyFileSystem(AtomicWriteHandler(fs) if local else FSSpecHandler(fs)), path


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
            raise JobError(f"input.path: {url} does not exist")
        if not found:
            raise JobError(f"input.path: no Parquet files at {url}")
        files.extend(found)
    return PyFileSystem(FSSpecHandler(fs)), files


def parquet_dataset(files: list[str], fs: FileSystem) -> pads.Dataset:
    return pads.dataset(files, format="parquet", filesystem=fs)


def remove_tree(url: str, storage: StorageConfig) -> None:
    fs, path = fsspec_fs(url, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def output_files(url: str, storage: StorageConfig) -> list[str]:
    fs, path = fsspec_fs(url, storage)
    return sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.exists(path) else []


def output_rows(url: str, storage: StorageConfig, columns: list[str], files: list[str] | None = None):
    """`columns` of the job's output (or of the given files of it) as a pyarrow Table; empty when
    there is none. Columns the files lack (older outputs have no `error_kind`) are left out."""
    import pyarrow as pa

    fs, _ = fsspec_fs(url, storage)
    files = output_files(url, storage) if files is None else files
    if not files:
        return pa.table({c: pa.array([], pa.int64()) for c in columns})
    dataset = parquet_dataset(files, PyFileSystem(FSSpecHandler(fs)))
    return dataset.to_table(columns=[c for c in columns if c in dataset.schema.names])
