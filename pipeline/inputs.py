"""What the job's input holds, checked before Ray starts: files, column types, ids.

Everything that can be known from the input files' schemas and id column (as its Reader,
`readers.py`, gives them) is refused here in
one line (a JobError) instead of failing after Ray has started: a missing or wrongly typed
column, ids of a type that cannot key exactly-once output, null or repeated ids, files whose
column types disagree, input names that collide with the output's own columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from .config import Config
from .errors import JobError
from .readers import Reader
from .stages import PREPARED_FIELDS, RESULT_FIELDS

logger = logging.getLogger(__name__)

# What the stages write: an input column carried to the output may not take one of these names.
STAGE_COLUMNS = {f.name for f in PREPARED_FIELDS + RESULT_FIELDS}


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _hf_image(t: pa.DataType) -> bool:
    """The Hugging Face `datasets` Image layout: struct<bytes: binary, path: string>."""
    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    return set(names) == {"bytes", "path"} and _is_binary(names["bytes"]) and _is_string(names["path"])


def _image_ok(t: pa.DataType) -> bool:
    one = lambda x: _is_binary(x) or _hf_image(x) or pa.types.is_null(x)  # noqa: E731
    return one(t) or (_is_list(t) and one(t.value_type))


def _path_ok(t: pa.DataType) -> bool:
    return _is_string(t) or pa.types.is_null(t) or (_is_list(t) and (_is_string(t.value_type) or pa.types.is_null(t.value_type)))


def _text_ok(t: pa.DataType) -> bool:
    return _is_string(t) or pa.types.is_null(t)


def _id_ok(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or _is_string(t)


@dataclass(frozen=True)
class InputPlan:
    reader: Reader  # the input's files in its format
    columns: list[str]  # what the job reads, in order
    schema: pa.Schema  # their types (the first file's)
    id_type: pa.DataType
    rows: int
    dropped_duplicates: int  # rows that repeat an earlier id (input.duplicate_ids: keep_first)
    repeated_ids: list  # the ids that repeat (for the drop stage)
    ids_checked: bool = True  # False: left to check_ids_on_cluster (a large input)
    ids: pa.ChunkedArray | None = None  # the ids the driver's check read (None: not read there)


def _check_types(cfg: Config, files: list[str], schemas: list[pa.Schema]) -> list[str]:
    """The columns to read, after checking that every file gives each the same, usable type."""
    cols = cfg.input.columns
    names = set(schemas[0].names)
    if cols.id not in names:
        raise JobError(f"input: id column {cols.id!r} not found; columns are {sorted(names)} (input.columns.id)")
    if cols.image not in names and cols.image_path not in names and cols.messages not in names:
        raise JobError(
            f"input: no image column: expected {cols.image!r} (bytes) or {cols.image_path!r} (path/URL); "
            f"columns are {sorted(names)} (input.columns.image / image_path)"
        )
    missing = [c for c in cfg.input.passthrough if c not in names]
    if missing:
        raise JobError(f"input.passthrough: columns {missing} not in the input; columns are {sorted(names)}")
    missing = [c for c in cfg.prompt.template_columns() if c not in names]
    if missing:
        raise JobError(f"prompt.template: {{{missing[0]}}} names no input column; columns are {sorted(names)}")
    wanted = [cols.id, cols.image, cols.image_path, cols.prompt, cols.messages, *cfg.input.passthrough,
              *cfg.prompt.template_columns()]
    columns = [c for c in dict.fromkeys(wanted) if c in names]

    for f, schema in zip(files[1:], schemas[1:]):
        for c in columns:
            if c not in schema.names:
                raise JobError(f"input: column {c!r} is in {files[0]} but not in {f}; every file needs the same columns")
            a, b = schemas[0].field(c).type, schema.field(c).type
            if a != b and not (pa.types.is_null(a) or pa.types.is_null(b)):
                raise JobError(f"input: column {c!r} is {a} in {files[0]} but {b} in {f}; write every file with one type")

    kinds = {
        cols.id: (_id_ok, "integers or strings (cast float, dictionary, binary or timestamp ids to int64 or string)"),
        cols.image: (_image_ok, "binary (encoded image bytes), struct<bytes, path> (Hugging Face Image), or a list of them"),
        cols.image_path: (_path_ok, "string (path or URL) or a list of strings"),
        cols.prompt: (_text_ok, "string"),
        cols.messages: (_text_ok, "string (an OpenAI-style conversation as JSON)"),
    }
    for c in columns:
        if c in kinds:
            ok, expected = kinds[c]
            t = schemas[0].field(c).type
            if not ok(t):
                what = "id column" if c == cols.id else "column"
                raise JobError(f"input: {what} {c!r} is {t}; expected {expected}")

    carried = [cols.id, *cfg.input.passthrough]
    for c in carried:
        if c in STAGE_COLUMNS:
            key = "input.columns.id" if c == cols.id else "input.passthrough"
            raise JobError(f"{key}: input column {c!r} collides with a column the job writes; rename it in the input")
    return columns


def _verdict(cfg: Config, repeated: list[tuple]) -> tuple[int, list]:
    """(rows that repeat an earlier id, the ids that repeat) from (id, rows) of each id seen more
    than once or null; raises on a null id, and on a repeat unless keep_first."""
    nulls = sum(n for v, n in repeated if v is None)
    if nulls:
        raise JobError(f"input: {nulls} rows have a null id (column {cfg.input.columns.id!r}); every row needs an id")
    if not repeated:
        return 0, []
    dropped, ids = sum(n - 1 for _, n in repeated), [v for v, _ in repeated]
    if cfg.input.duplicate_ids == "error":
        raise JobError(
            f"input: {dropped} rows repeat an id ({len(ids)} ids, e.g. {ids[0]!r}); ids must be unique "
            "for exactly-once output and resume. Fix the input, set input.duplicate_ids=keep_first, or "
            "input.duplicate_ids=trust for an input known to be unique"
        )
    logger.warning("input: dropping %d rows whose id appeared earlier (input.duplicate_ids=keep_first)", dropped)
    return dropped, ids


def _repeats(ids: pa.ChunkedArray) -> list[tuple]:
    """(id, rows) of each id that repeats or is null, from ids on the driver."""
    counts = pc.value_counts(ids).flatten()
    values, n = counts
    keep = pc.or_(pc.greater(n, 1), pc.is_null(values))
    return list(zip(values.filter(keep).to_pylist(), n.filter(keep).to_pylist()))


def inspect_input(cfg: Config, reader: Reader) -> InputPlan:
    """Check the input (`readers.open_input`) and return what to read; JobError (one line)
    when it cannot serve the job. The ids of an input over `input.driver_id_check_max_rows`
    are left to `check_ids_on_cluster`, once Ray runs (`ids_checked` False)."""
    schemas = reader.schemas()
    columns = _check_types(cfg, reader.files, schemas)
    # Each column's type: the first file's, unless a file before had only nulls there.
    schema = pa.schema([next((f for f in (s.field(c) for s in schemas) if not pa.types.is_null(f.type)), schemas[0].field(c))
                        for c in columns])
    rows = reader.count()
    trust = cfg.input.duplicate_ids == "trust"
    on_driver = not trust and rows <= cfg.input.driver_id_check_max_rows
    ids = reader.ids(cfg.input.columns.id) if on_driver else None
    dropped, repeated = _verdict(cfg, _repeats(ids)) if ids is not None else (0, [])
    return InputPlan(reader=reader, columns=columns, schema=schema, id_type=schema.field(cfg.input.columns.id).type,
                     rows=rows, dropped_duplicates=dropped, repeated_ids=repeated, ids_checked=trust or on_driver, ids=ids)


def check_ids_on_cluster(cfg: Config, plan: InputPlan) -> InputPlan:
    """The id check of a large input, on the cluster (`Reader.repeated_ids`), before any work."""
    if plan.ids_checked:
        return plan
    logger.info("input: checking %d ids for repeats on the cluster", plan.rows)
    dropped, repeated = _verdict(cfg, plan.reader.repeated_ids(cfg.input.columns.id, plan.schema, plan.rows))
    return replace(plan, dropped_duplicates=dropped, repeated_ids=repeated, ids_checked=True)
