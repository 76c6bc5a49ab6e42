"""Input formats: one Reader per `input.format`, each on Ray Data's own reader.

A Reader lists the input's files, gives each file's Arrow schema and the id column for the
start-up checks (`inputs.py`), and builds the Ray Data Dataset of input rows (`job.py`). A new
format is a Reader here (and, if its rows need it, a case in `Record.from_row`).
"""

from __future__ import annotations

import logging
import posixpath
from typing import ClassVar

import pyarrow as pa

from .config import Config
from .errors import JobError
from .storage import input_files, parquet_dataset

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

    def dataset(self, columns: list[str], schema: pa.Schema):
        """The Ray Data Dataset of `columns`, typed as `schema` says (the first file's types)."""
        raise NotImplementedError

    def _unreadable(self, path: str, e: Exception) -> JobError:
        return JobError(f"input.path: {path} is not a readable {self.what} file: {str(e).strip().splitlines()[0]}")


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

    def dataset(self, columns: list[str], schema: pa.Schema):
        import ray

        return ray.data.read_parquet(self.files, filesystem=self.fs).select_columns(columns)


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


READERS: dict[str, type[Reader]] = {r.format: r for r in (ParquetReader, JsonReader, CsvReader)}


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


def open_input(cfg: Config) -> Reader:
    """The Reader for `input.format` (auto: by the files' extensions, said in the log)."""
    if cfg.input.format == "auto":
        reader = _auto(cfg)
        logger.info("input.format auto: reading %s as %s", cfg.input.path, reader.format)
    else:
        reader = READERS[cfg.input.format]
    return reader(cfg)
