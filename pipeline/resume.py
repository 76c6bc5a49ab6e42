"""Resume bookkeeping on top of Ray Data's checkpointing (`DataContext.checkpoint_config`).

The output is the truth: before a resumed run, `reconcile` makes the checkpoint list exactly
the ids the output holds (a folder cleaned by hand, a checkpoint deleted), so a rerun never
duplicates a row and never skips one.

Ray writes one checkpoint file (the ids of a block) per output data file, with a two-phase
commit: `<prefix>.pending.parquet` before the data file `<prefix>-<n>.parquet`, renamed to
`<prefix>.parquet` after it. A re-run skips committed ids and deletes the data files of
uncommitted blocks. For `--retry-failed`, this module removes failed rows from the output, and
`reconcile` takes their ids out of the checkpoint.
"""

from __future__ import annotations

import logging
import posixpath
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config
from .errors import JobError
from .storage import fsspec_fs, open_atomic, output_files, read_output_file, write_output_file

logger = logging.getLogger(__name__)

PENDING = ".pending.parquet"


def checkpoint_path(cfg: Config) -> str:
    """Beside the output, not inside it, so readers of the output never see checkpoint files."""
    return cfg.output.path.rstrip("/") + ".checkpoint"


def _read(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """One file of the output (Parquet or JSON Lines) or the checkpoint; one that cannot be read
    (a partial file left by a version that published on error, a file damaged since) is a
    one-line JobError naming it."""
    try:
        return read_output_file(fs, path, columns)
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())
        kind = "Parquet" if path.endswith(".parquet") else "JSON Lines"
        raise JobError(
            f"output.path: {path} is not a readable {kind} file ({type(e).__name__}: {reason}); move it away and "
            "rerun: the rows it held run again"
        ) from None


def _pending_prefixes(cfg: Config) -> tuple[list[str], tuple[str, ...]]:
    """(committed checkpoint files, prefixes of the data files whose checkpoint is still pending)."""
    ckpt_fs, root = fsspec_fs(checkpoint_path(cfg), cfg.storage)
    found = sorted(p for p in ckpt_fs.find(root) if p.endswith(".parquet")) if ckpt_fs.exists(root) else []
    pending = tuple(posixpath.basename(p)[: -len(PENDING)] for p in found if p.endswith(PENDING))
    return [p for p in found if not p.endswith(PENDING)], pending


def split_output(cfg: Config) -> tuple[list[str], list[str]]:
    """(committed, uncommitted) data files of the output. Uncommitted ones belong to a block whose
    checkpoint is still pending (a stop between the data file and its commit): Ray Data deletes
    them when the run starts and their rows run again, so they count for nothing."""
    _, pending = _pending_prefixes(cfg)
    files = output_files(cfg.output.path, cfg.storage)
    doomed = [f for f in files if pending and posixpath.basename(f).startswith(pending)]
    return [f for f in files if f not in doomed], doomed


def drop_failed_rows(cfg: Config, kinds: list[str] | None = None) -> int:
    """Remove rows with an `error` (of `kinds`, or any) from the output, so the next run
    processes them again: `reconcile` then drops their ids from the checkpoint (the output is
    the truth). Returns how many rows were removed."""
    out_fs, out_root = fsspec_fs(cfg.output.path, cfg.storage)
    removed = 0
    for path in split_output(cfg)[0]:
        table = _read(out_fs, path)
        failed = pc.is_valid(table.column("error"))
        if kinds and "error_kind" in table.schema.names and not pa.types.is_null(table.schema.field("error_kind").type):
            failed = pc.and_(failed, pc.fill_null(pc.is_in(table.column("error_kind"), value_set=pa.array(kinds)), False))
        n_failed = pc.sum(failed.cast("int64")).as_py() or 0
        if n_failed:
            write_output_file(out_fs, path, table.filter(pc.invert(failed)))
            removed += n_failed
    logger.info("retry-failed: %d rows will be processed again", removed)
    return removed


def _ids(fs, files: list[str], id_col: str) -> pa.ChunkedArray:
    """The ids of checkpoint or output files (Parquet or JSON Lines)."""
    tables = [_read(fs, f, [id_col]) for f in files]
    return pa.concat_tables(tables).column(0) if tables else pa.chunked_array([], pa.null())


def _count_not_in(values: pa.ChunkedArray, others: pa.ChunkedArray) -> int:
    if not len(values):
        return 0
    if not len(others):
        return len(values)
    return len(values) - (pc.sum(pc.is_in(values, value_set=others.combine_chunks())).as_py() or 0)


def _kind(t: pa.DataType) -> str:
    return "integer" if pa.types.is_integer(t) else "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else str(t)


def reconcile(cfg: Config, id_type: pa.DataType) -> str | None:
    """Make the checkpoint agree with the output; returns what was repaired, or None.

    Data files that belong to a pending (uncommitted) checkpoint are left out: Ray deletes them
    when the run starts, and their rows run again."""
    id_col = cfg.input.columns.id
    ckpt_fs, root = fsspec_fs(checkpoint_path(cfg), cfg.storage)
    committed, _ = _pending_prefixes(cfg)
    out_fs, _ = fsspec_fs(cfg.output.path, cfg.storage)
    data, _ = split_output(cfg)

    checkpointed = _ids(ckpt_fs, committed, id_col)
    written = _ids(out_fs, data, id_col)
    for what, ids in (("checkpoint", checkpointed), ("output", written)):
        if len(ids) and _kind(ids.type) != _kind(id_type):
            raise JobError(
                f"output.path: the existing {what} has {ids.type} ids but the input's are {id_type}; this output belongs "
                "to another input. Use another output.path, or output.mode=overwrite"
            )
    repeated = len(written) - pc.count_distinct(written, mode="all").as_py() if len(written) else 0
    if repeated:
        raise JobError(
            f"output.path: {repeated} rows of the existing output repeat an id (two runs wrote it at once?); "
            "remove the repeated files, or rerun with output.mode=overwrite"
        )
    # Arrow's hash sets, not Python's: 10M ids cost their Arrow bytes (~200 MB), not GBs of objects.
    if len(written) and len(checkpointed):
        checkpointed = checkpointed.cast(written.type)
    lost = _count_not_in(pc.unique(checkpointed), written)  # checkpointed, no output row: run again
    unlisted = _count_not_in(written, checkpointed)  # in the output, not in the checkpoint: done
    if not lost and not unlisted:
        return None
    note = (f"checkpoint rebuilt from the output: {lost} checkpointed ids had no output row (they run "
            f"again), {unlisted} output rows were missing from the checkpoint (they do not)")
    # Write the new list first, then drop the old: a stop in between leaves a superset, which the
    # next start reconciles again.
    ids = pa.table({id_col: written.combine_chunks() if len(written) else pa.array([], id_type)})
    ckpt_fs.makedirs(root, exist_ok=True)
    with open_atomic(ckpt_fs, posixpath.join(root, f"reconciled-{uuid.uuid4().hex}.parquet")) as f:
        pq.write_table(ids, f)
    for p in committed:
        ckpt_fs.rm(p)
    logger.warning(note)
    return note
