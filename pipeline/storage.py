"""Where input and output live: local paths, globs and s3:// through fsspec, as pyarrow filesystems."""

from __future__ import annotations

import logging
import posixpath
import sys
from typing import Any, Callable

import pyarrow.dataset as pads
from pyarrow import PythonFile
from pyarrow.fs import FileSystem, FSSpecHandler, PyFileSystem

from .config import StorageConfig
from .errors import JobError, one_line

logger = logging.getLogger(__name__)

# The lease's fence (lease.Fence), called before each change to the output or checkpoint: a run
# whose lease was taken over changes nothing more. None: no lease (tests, benchmarks).
FenceCheck = Callable[[], None] | None


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


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class open_atomic:
    """A file written under a hidden name and renamed into place only after a clean close, so a
    reader never sees a partial file. A write or close that fails, or an error inside the `with`
    block, removes the hidden file instead: nothing appears under the real name.

    pyarrow's streams (`NativeFile.__exit__`, `ParquetWriter.__exit__`) close whether their block
    raised or not, so `close` itself looks for an exception being handled that was not already in
    flight when the file was opened: a close during the unwinding of its own write discards.
    `fence`, when given, is called before the rename; if it raises, nothing is published."""

    def __init__(self, fs, path: str, fence: FenceCheck = None):
        head, tail = posixpath.split(path)
        self.fs, self.path, self.tmp, self.fence = fs, path, posixpath.join(head, f".{tail}.inprogress"), fence
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
            if self.fence is not None:  # still this run's output? (pipeline/lease.py)
                self.fence()
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


class fenced_upload:
    """An object-store upload (published only when it completes, at close) that completes only
    if `fence()` passes then; otherwise it is discarded."""

    def __init__(self, f, fence: Callable[[], None]):
        self.f, self.fence = f, fence

    def __getattr__(self, name):
        return getattr(self.f, name)

    def close(self) -> None:
        if not self.f.closed:
            try:
                self.fence()
            except BaseException:
                self.f.discard()
                self.f.closed = True  # nothing to upload, now or when collected
                raise
            self.f.close()


class OutputHandler(FSSpecHandler):
    """A file appears under its name only once it is complete (local and network file systems
    show a half-written file to readers, and keep it if the job is killed; object stores publish
    an object only when its upload completes), and with a `fence` only while it passes."""

    def __init__(self, fs, fence: FenceCheck = None):
        super().__init__(fs)
        self.fence = fence

    def open_output_stream(self, path, metadata):
        if is_local(self.fs):
            return PythonFile(open_atomic(self.fs, path, self.fence), mode="w")
        if self.fence is not None:
            return PythonFile(fenced_upload(self.fs.open(path, "wb"), self.fence), mode="w")
        return super().open_output_stream(path, metadata)


def arrow_fs(url: str, storage: StorageConfig, fence: FenceCheck = None) -> tuple[FileSystem, str]:
    """A pyarrow filesystem for writing under `url`: files appear whole, and only while `fence` passes."""
    fs, path = fsspec_fs(url, storage)
    return PyFileSystem(OutputHandler(fs, fence)), path


def input_files(paths: str | list[str], storage: StorageConfig, extensions: tuple[str, ...] = (".parquet",),
                what: str = "Parquet") -> tuple[FileSystem, list[str]]:
    """Expand files, folders and globs to the input files they name (sorted, deterministic): a
    folder to its files ending in one of `extensions`, a glob to every file it matches."""
    urls = [paths] if isinstance(paths, str) else list(paths)
    files: list[str] = []
    fs = None
    for url in urls:
        try:
            fs, path = fsspec_fs(url, storage)
            if any(ch in path for ch in "*?["):
                found = sorted(fs.glob(path))
            else:
                try:  # info(), not exists(): that hides a credentials error as "missing"
                    kind = fs.info(path)["type"]
                except FileNotFoundError:
                    raise JobError(f"input.path: {url} does not exist") from None
                found = sorted(p for p in fs.find(path) if p.lower().endswith(extensions)) if kind == "directory" else [path]
        except JobError:
            raise
        except Exception as e:  # credentials, access denied, a bucket that is not there, a bad URL
            raise JobError(f"input.path: cannot read {url}: {one_line(e)}") from None
        if not found:
            raise JobError(f"input.path: no {what} files at {url}")
        files.extend(found)
    return PyFileSystem(FSSpecHandler(fs)), files


def parquet_dataset(files: list[str], fs: FileSystem) -> pads.Dataset:
    return pads.dataset(files, format="parquet", filesystem=fs)


def remove_tree(url: str, storage: StorageConfig) -> None:
    fs, path = fsspec_fs(url, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# Output data files, by what the job writes (output.format): Parquet, or JSON Lines (Ray's
# write_json names them .json). Names starting with "_" or "." are not data (_manifest.json,
# a file being written).
OUTPUT_SUFFIXES = (".parquet", ".json")


def output_files(url: str, storage: StorageConfig) -> list[str]:
    """The output's data files, of either format (a resumed output may hold both)."""
    fs, path = fsspec_fs(url, storage)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(OUTPUT_SUFFIXES) and not posixpath.basename(p).startswith(("_", ".")))


def read_output_file(fs, path: str, columns: list[str] | None = None):
    """One output data file as a pyarrow Table (by its suffix); `columns` it lacks are left out."""
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        table = pq.read_table(f) if path.endswith(".parquet") else pajson.read_json(f)
    return table if columns is None else table.select([c for c in columns if c in table.column_names])


def write_output_file(fs, path: str, table, fence: FenceCheck = None) -> None:
    """Replace an output data file atomically, in its own format (JSON Lines as Ray writes it);
    with a `fence`, only while it passes."""
    import pyarrow.parquet as pq

    with open_atomic(fs, path, fence) as f:
        if path.endswith(".parquet"):
            pq.write_table(table, f)
        else:
            f.write(table.to_pandas().to_json(orient="records", lines=True).encode())


def output_batches(url: str, storage: StorageConfig, columns: list[str], files: list[str] | None = None):
    """`columns` of the job's output (or of the given files of it), one Arrow table per JSON
    file or Parquet record batch: a caller that folds them holds one batch, however large the
    output. Columns the files lack (older outputs have no `error_kind`) are left out."""
    import pyarrow as pa

    fs, _ = fsspec_fs(url, storage)
    files = output_files(url, storage) if files is None else files
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet:
        dataset = parquet_dataset(parquet, PyFileSystem(FSSpecHandler(fs)))
        for batch in dataset.to_batches(columns=[c for c in columns if c in dataset.schema.names]):
            yield pa.Table.from_batches([batch])
    for f in files:
        if not f.endswith(".parquet"):
            yield read_output_file(fs, f, columns)


def output_rows(url: str, storage: StorageConfig, columns: list[str], files: list[str] | None = None):
    """`columns` of the job's output (or of the given files of it) as one pyarrow Table; empty
    when there is none."""
    import pyarrow as pa

    tables = list(output_batches(url, storage, columns, files))
    if not tables:
        return pa.table({c: pa.array([], pa.int64()) for c in columns})
    # JSON files type an all-null column as null: promoted to the other files' type.
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
