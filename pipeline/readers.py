"""Input formats: one Reader per `input.format`, each on Ray Data's own reader.

A Reader lists the input's files, gives each file's Arrow schema and the id column for the
start-up checks (`inputs.py`), and builds the Ray Data Dataset of input rows (`job.py`). A new
format is a Reader here (and, if its rows need it, a case in `Record.from_row`).
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa

from .config import Config
from .errors import JobError, first_line
from .storage import fsspec_fs, input_files, parquet_dataset

logger = logging.getLogger(__name__)


class Reader:
    """The files of one input in one format. `schemas()` and `ids()` are read on the driver
    before Ray starts; `dataset()` builds the Dataset the job runs on."""

    format: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]
    what: ClassVar[str]  # for messages: "Parquet", "JSON Lines", ...

    def __init__(self, cfg: Config, fs=None, files: list[str] | None = None):
        self.cfg = cfg
        if files is None:
            fs, files = input_files(cfg.input.path, cfg.storage, self.extensions, self.what)
        self.fs, self.files = fs, files

    def schemas(self) -> list[pa.Schema]:
        """One per file, in `files` order; JobError (one line) for a file that cannot be read."""
        raise NotImplementedError

    def ids(self, column: str) -> pa.ChunkedArray:
        raise NotImplementedError

    def count(self) -> int:
        """Rows in the input, as cheaply as the format allows."""
        return len(self.ids(self.cfg.input.columns.id))

    def dataset(self, columns: list[str], schema: pa.Schema):
        """The Ray Data Dataset of `columns`, typed as `schema` says (the first file's types)."""
        raise NotImplementedError

    @contextmanager
    def reading(self):
        """Settings Ray Data takes from this process while it reads this input (the job's and the
        plan's execution runs inside)."""
        yield

    def repeated_ids(self, column: str, schema: pa.Schema, rows: int) -> list[tuple]:
        """(id, rows) of each id that repeats or is null, by a Ray Data hash aggregation on the
        cluster over the input's `rows`: the driver holds only those, however large the input."""
        with self.reading():
            return _repeated(self.dataset([column], pa.schema([schema.field(column)])), column, rows)

    def _unreadable(self, path: str, e: Exception) -> JobError:
        return JobError(f"input.path: {path} is not a readable {self.what} file: {first_line(e)}")


FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_FILES_PER_ACTOR = 128  # Ray's FooterReader reads 128 footers at once (its io_concurrency)
READ_UNIT_ENV = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"
READ_UNIT_BYTES = 16 * 1024**2  # uncompressed bytes of rows one read task reads (a larger row group: alone)


class ParquetReader(Reader):
    format, extensions, what = "parquet", (".parquet",), "Parquet"

    def schemas(self) -> list[pa.Schema]:
        import pyarrow.parquet as pq

        out = []
        for f in self.files:
            try:
                with self.fs.open_input_file(f) as handle:
                    out.append(pq.read_schema(handle))
            except (OSError, pa.ArrowInvalid) as e:
                raise self._unreadable(f, e) from None
        return out

    def ids(self, column: str) -> pa.ChunkedArray:
        return parquet_dataset(self.files, self.fs).to_table(columns=[column]).column(0)

    def count(self) -> int:
        return parquet_dataset(self.files, self.fs).count_rows()  # the files' footers only

    def dataset(self, columns: list[str], schema: pa.Schema):
        import ray

        return ray.data.read_parquet(self.files, filesystem=self.fs).select_columns(columns)

    @contextmanager
    def reading(self):
        """Two of Ray Data's Parquet reader's settings, sized for image rows. (1) It reads the
        files' footers on a pool of actors, 32 by default (sized for thousands of files): each a
        worker process started for every read, which on a small input costs more than the read;
        here one actor per FOOTER_FILES_PER_ACTOR files (each reads that many at once). (2) It
        packs row groups into read units of up to 128 MiB: ~1,300 photos that one task holds in
        its heap (~3x over) and puts in the object store as one block, half the job's budget
        there; the next stage cuts them into `rows_per_block` rows anyway. READ_UNIT_BYTES keeps
        the job's memory flat as the input grows (benchmarks/README.md, "Memory as rows grow").
        Ray reads both from this process's environment as the Dataset is built; a user's own
        setting wins."""
        settings = {FOOTER_ACTORS_ENV: str(min(32, -(-len(self.files) // FOOTER_FILES_PER_ACTOR))),
                    READ_UNIT_ENV: str(READ_UNIT_BYTES)}
        ours = [k for k in settings if k not in os.environ]
        os.environ.update({k: settings[k] for k in ours})
        try:
            yield
        finally:
            for k in ours:
                del os.environ[k]


class _TextTableReader(Reader):
    """JSON Lines and CSV manifests: each file is parsed once on the driver (schemas, ids), and
    Ray's reader is given the types found there, so every block of every file agrees."""

    def __init__(self, cfg: Config, fs=None, files: list[str] | None = None):
        super().__init__(cfg, fs, files)
        self._schemas: list[pa.Schema] | None = None
        self._ids: pa.ChunkedArray | None = None

    def _parse(self, stream) -> pa.Table:
        raise NotImplementedError

    def schemas(self) -> list[pa.Schema]:
        if self._schemas is None:
            self._schemas, id_column, ids = [], self.cfg.input.columns.id, []
            for f in self.files:
                try:
                    with self.fs.open_input_stream(f) as stream:
                        table = self._parse(stream)
                except (OSError, pa.ArrowInvalid) as e:
                    raise self._unreadable(f, e) from None
                self._schemas.append(table.schema)
                if id_column in table.column_names:  # inputs.py refuses a file without it
                    ids.extend(table.column(id_column).chunks)
            self._ids = pa.chunked_array(ids, self._schemas[0].field(id_column).type) if ids else None
        return self._schemas

    def ids(self, column: str) -> pa.ChunkedArray:
        """The id column of every file (after `schemas()` has checked they agree)."""
        self.schemas()
        return self._ids

    @staticmethod
    def _types(columns: list[str], schema: pa.Schema) -> dict[str, pa.DataType]:
        return {c: schema.field(c).type for c in columns}


class JsonReader(_TextTableReader):
    format, extensions, what = "json", (".jsonl", ".json", ".ndjson"), "JSON Lines"

    def _parse(self, stream) -> pa.Table:
        import pyarrow.json as pajson

        return pajson.read_json(stream)

    def dataset(self, columns: list[str], schema: pa.Schema):
        import pyarrow.json as pajson
        import ray

        parse = pajson.ParseOptions(explicit_schema=pa.schema(self._types(columns, schema)))
        return ray.data.read_json(self.files, filesystem=self.fs, file_extensions=None, parse_options=parse).select_columns(columns)


class CsvReader(_TextTableReader):
    format, extensions, what = "csv", (".csv",), "CSV"

    def _parse(self, stream) -> pa.Table:
        import pyarrow.csv as pacsv

        return pacsv.read_csv(stream, convert_options=self._convert(None))

    @staticmethod
    def _convert(column_types: dict | None):
        import pyarrow.csv as pacsv

        # An empty cell is null (no URL, no prompt), not the empty string.
        return pacsv.ConvertOptions(strings_can_be_null=True, column_types=column_types or {})

    def dataset(self, columns: list[str], schema: pa.Schema):
        import ray

        convert = self._convert(self._types(columns, schema))
        return ray.data.read_csv(self.files, filesystem=self.fs, convert_options=convert).select_columns(columns)


def _named_files(cfg: Config, extensions: tuple[str, ...], what: str) -> tuple:
    """(fs, files, names, urls) of an input's files: each file's name relative to its root (the
    folder; a glob: its folder before the first wildcard; a file: its folder) and its full URL."""
    urls = [cfg.input.path] if isinstance(cfg.input.path, str) else list(cfg.input.path)
    names, full, listed, fs = [], [], [], None
    for url in urls:
        fs, files = input_files(url, cfg.storage, extensions, what)
        path = fsspec_fs(url, cfg.storage)[1]
        if any(ch in path for ch in "*?["):
            root = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        else:
            root = posixpath.dirname(path) if files == [path] else path.rstrip("/")
        scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
        names += [posixpath.relpath(f, root) for f in files]
        full += [scheme + f for f in files]
        listed += files
    return fs, listed, names, full


class ImagesReader(Reader):
    """A folder, prefix or glob of image files: one row per file, its id the path relative to
    the input's root (`_named_files`) and its `image_path` the file's full path or URL. Only
    names cross to Ray: each image is read by the CPU actors (`images.py`), as an `image_path`
    column is."""

    format, what = "images", "image"
    extensions = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

    def __init__(self, cfg: Config):
        fs, files, self.names, self.urls = _named_files(cfg, self.extensions, self.what)
        super().__init__(cfg, fs, files)

    def _table(self) -> pa.Table:
        cols = self.cfg.input.columns
        return pa.table({cols.id: pa.array(self.names, pa.string()), cols.image_path: pa.array(self.urls, pa.string())})

    def schemas(self) -> list[pa.Schema]:
        return [self._table().schema] * len(self.files)

    def ids(self, column: str) -> pa.ChunkedArray:
        return pa.chunked_array([pa.array(self.names, pa.string())])

    def dataset(self, columns: list[str], schema: pa.Schema):
        import ray

        # A Read (not from_arrow), so Ray's checkpoint filter and writer apply: resume works.
        return ray.data.read_datasource(_table_source(self._table().select(columns), self.cfg.resources.rows_per_block))


@dataclass(frozen=True)
class _Samples:
    """How a WebDataset sample becomes a row: what the read tasks need, and nothing else (no
    config, no credentials)."""

    id_column: str
    image_column: str
    image_keys: tuple[str, ...]
    shard_names: dict[str, str]  # shard path -> its name under the input's root
    repeated: frozenset[str]  # keys found in more than one shard

    def id(self, shard: str, key: str) -> str:
        return f"{self.shard_names[shard]}/{key}" if key in self.repeated else key

    def table(self, samples, shard: str, schema: pa.Schema) -> pa.Table:
        """Ray's undecoded samples of one shard (a DataFrame of member bytes) -> typed rows."""
        records = samples.to_dict("records")
        data = {}
        for field in schema:
            if field.name == self.id_column:
                data[field.name] = [self.id(shard, r["__key__"]) for r in records]
            elif field.name == self.image_column:
                data[field.name] = [next((r[k] for k in self.image_keys if isinstance(r.get(k), bytes)), None)
                                    for r in records]
            else:  # a text member; a byte that is not UTF-8 becomes U+FFFD, never a failed read
                data[field.name] = [r[field.name].decode("utf-8", "replace") if isinstance(r.get(field.name), bytes)
                                    else None for r in records]
        return pa.table(data, schema=schema)


class WebDatasetReader(Reader):
    """WebDataset tar shards (img2dataset, NeMo): one row per sample, read by Ray Data's own
    WebDataset reader. The id is the sample key; a key found in several shards is prefixed with
    its shard's name (`_named_files`), so ids are unique and the same on every run. The image is
    the sample's first member named in `input.webdataset.image_keys`; every other member becomes
    a string column named by its extension (`txt`, `json`), for passthrough and `prompt.template`.

    The start-up checks scan the shards' tar headers (members are skipped, not read): the keys
    for the ids, the extensions for the columns; a shard that is not a readable tar or splits a
    sample is refused there, before any work."""

    format, extensions, what = "webdataset", (".tar",), "WebDataset tar"

    def __init__(self, cfg: Config):
        fs, files, names, _ = _named_files(cfg, self.extensions, self.what)
        super().__init__(cfg, fs, files)
        self._names = dict(zip(files, names))
        self._samples: _Samples | None = None
        self._keys: list[list[str]] = []  # per shard, its samples' keys in order
        self._members: list[str] = []  # every member extension seen, in order of first appearance

    def _scan(self) -> _Samples:
        if self._samples is None:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(16, len(self.files))) as pool:  # latency-bound on object stores
                found = list(pool.map(self._scan_shard, self.files))
            self._keys = [keys for keys, _ in found]
            self._members = list(dict.fromkeys(m for _, members in found for m in members))
            counts = Counter(k for keys in self._keys for k in keys)
            cols = self.cfg.input.columns
            self._samples = _Samples(cols.id, cols.image, tuple(self.cfg.input.webdataset.image_keys), self._names,
                                     frozenset(k for k, n in counts.items() if n > 1))
        return self._samples

    def _scan_shard(self, path: str) -> tuple[list[str], list[str]]:
        import tarfile

        from ray.data._internal.datasource.webdataset_datasource import _group_by_keys

        try:
            with self.fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                members = [{"fname": m.name, "data": None} for m in tar if m.isreg()]
            # Ray's own grouping, so these keys are the keys its reader gives.
            samples = list(_group_by_keys(iter(members), meta={"__url__": path}))
        except (OSError, tarfile.TarError, ValueError) as e:
            raise self._unreadable(path, e) from None
        return [s["__key__"] for s in samples], [k for s in samples for k in s if not k.startswith("__")]

    def schemas(self) -> list[pa.Schema]:
        samples = self._scan()
        fields = [pa.field(samples.id_column, pa.string()), pa.field(samples.image_column, pa.binary())]
        taken = {samples.id_column, samples.image_column, *samples.image_keys}
        fields += [pa.field(m, pa.string()) for m in self._members if m not in taken]
        return [pa.schema(fields)] * len(self.files)

    def ids(self, column: str) -> pa.ChunkedArray:
        samples = self._scan()
        ids = [samples.id(f, k) for f, keys in zip(self.files, self._keys) for k in keys]
        return pa.chunked_array([pa.array(ids, pa.string())])

    def dataset(self, columns: list[str], schema: pa.Schema):
        import ray

        return ray.data.read_datasource(_shards_source(self.files, self.fs, self._scan(), schema))


def _table_source(table: pa.Table, rows_per_task: int):
    """A Ray Data datasource over a table the driver already holds (an input's listing)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class TableSource(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return table.nbytes

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            step = max(rows_per_task, -(-table.num_rows // max(parallelism, 1)))
            slices = [table.slice(i, step) for i in range(0, table.num_rows, step)]
            return [ReadTask(lambda part=part: [part], BlockMetadata(part.num_rows, part.nbytes, None, None),
                             schema=table.schema, per_task_row_limit=per_task_row_limit) for part in slices]

    return TableSource()


def _shards_source(files: list[str], fs, samples: _Samples, schema: pa.Schema):
    """Ray Data's WebDataset datasource, members left undecoded (the CPU actors decode images,
    as for every format), each shard's samples typed as `schema` (`_Samples.table`)."""
    from ray.data._internal.datasource.webdataset_datasource import WebDatasetDatasource

    class Shards(WebDatasetDatasource):
        def _read_stream(self, stream, path: str):
            for part in super()._read_stream(stream, path):
                yield samples.table(part, path, schema)

    return Shards(files, decoder=None, filesystem=fs, file_extensions=None)


READERS: dict[str, type[Reader]] = {r.format: r for r in (ParquetReader, JsonReader, CsvReader, ImagesReader, WebDatasetReader)}


def _auto(cfg: Config) -> type[Reader]:
    """The format the input's file names say (Parquet when none says one: a file named without
    an extension); JobError when they say several."""
    known = tuple(e for r in READERS.values() for e in r.extensions)
    _, files = input_files(cfg.input.path, cfg.storage, known, ", ".join(r.what for r in READERS.values()))
    found = {r for f in files for r in READERS.values() if f.lower().endswith(r.extensions)}
    if not found:
        return ParquetReader
    if len(found) > 1:
        seen = sorted({posixpath.splitext(f)[1] or posixpath.basename(f) for f in files})
        formats = sorted(r.format for r in found)
        raise JobError(f"input.format: auto cannot tell the format of {seen} (would be {formats}); set input.format")
    return found.pop()


# Ids one hash partition of the repeat check holds (tens of MB): Ray Data's default is a fixed 200
# partitions, 200 reduce tasks whatever the size (~8 s of the check on a small input, 2 cores).
IDS_PER_PARTITION = 1_000_000


def _repeated(ds, column: str, rows: int) -> list[tuple]:
    from ray.data import DataContext
    from ray.data.expressions import col

    partitions = min(max(1, -(-rows // IDS_PER_PARTITION)), DataContext.get_current().default_hash_shuffle_parallelism)
    counts = ds.groupby(column, num_partitions=partitions).count()
    found = counts.filter(expr=(col("count()") > 1) | col(column).is_null()).take_all()
    return [(row[column], row["count()"]) for row in found]


def output_repeats(cfg: Config, files: list[str], id_type: pa.DataType, rows: int) -> int:
    """Of a resumed output's `rows` (its Parquet and JSON Lines data `files`), those that repeat an
    earlier row's id, counted on the cluster as the input's ids are (resume.reconcile, for a large
    output)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = fsspec_fs(cfg.output.path, cfg.storage)
    column, schema = cfg.input.columns.id, pa.schema([pa.field(cfg.input.columns.id, id_type)])
    readers = [reader(cfg, PyFileSystem(FSSpecHandler(fs)), mine)
               for reader in (ParquetReader, JsonReader) if (mine := [f for f in files if f.endswith(reader.extensions)])]
    if not readers:
        return 0
    with ExitStack() as reading:
        for r in readers:
            reading.enter_context(r.reading())
        parts = [r.dataset([column], schema) for r in readers]
        return sum(n - 1 for _, n in _repeated(parts[0].union(*parts[1:]) if parts[1:] else parts[0], column, rows))


def open_input(cfg: Config) -> Reader:
    """The Reader for `input.format` (auto: by the files' extensions, said in the log)."""
    if cfg.input.format == "auto":
        reader = _auto(cfg)
        logger.info("input.format auto: reading %s as %s", cfg.input.path, reader.format)
    else:
        reader = READERS[cfg.input.format]
    return reader(cfg)
