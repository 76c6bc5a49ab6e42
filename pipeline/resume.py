"""Resume bookkeeping on top of Ray Data's checkpointing (`DataContext.checkpoint_config`).

The output is the truth: before a resumed run, `reconcile` makes the checkpoint list exactly
the ids the output holds, one block at a time (a folder cleaned by hand, a checkpoint deleted), so a rerun never
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
from typing import Callable, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config
from .errors import JobError
from .storage import FenceCheck, fsspec_fs, open_atomic, output_files, read_output_file, write_output_file

logger = logging.getLogger(__name__)

PENDING = ".pending.parquet"


def _check(fence: FenceCheck) -> None:
    if fence is not None:
        fence()


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


def finish_commits(cfg: Config, fence: FenceCheck = None) -> int:
    """Drop each pending checkpoint file whose committed twin exists; returns how many.

    A commit renames `<base>.pending.parquet` to `<base>.parquet`; on an object store a rename is
    a copy, then a delete, so a stop in between leaves both. The copy means the block's data file
    was complete (Ray's own commit treats it as committed), but Ray's start deletes the data files
    of every pending checkpoint: finishing the rename keeps that block instead of running it again."""
    ckpt_fs, root = fsspec_fs(checkpoint_path(cfg), cfg.storage)
    if not ckpt_fs.exists(root):
        return 0
    names = {posixpath.basename(p) for p in ckpt_fs.find(root)}
    done = [n for n in names if n.endswith(PENDING) and n[: -len(PENDING)] + ".parquet" in names]
    for name in done:
        _check(fence)
        ckpt_fs.rm(posixpath.join(root, name))
    if done:
        logger.info("checkpoint: %d commits a stop interrupted after the copy were finished", len(done))
    return len(done)


def split_output(cfg: Config) -> tuple[list[str], list[str]]:
    """(committed, uncommitted) data files of the output. Uncommitted ones belong to a block whose
    checkpoint is still pending (a stop between the data file and its commit): Ray Data deletes
    them when the run starts and their rows run again, so they count for nothing."""
    _, pending = _pending_prefixes(cfg)
    files = output_files(cfg.output.path, cfg.storage)
    doomed = [f for f in files if pending and posixpath.basename(f).startswith(pending)]
    return [f for f in files if f not in doomed], doomed


def drop_failed_rows(cfg: Config, kinds: list[str] | None = None, fence: FenceCheck = None) -> int:
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
            write_output_file(out_fs, path, table.filter(pc.invert(failed)), fence)
            removed += n_failed
    logger.info("retry-failed: %d rows will be processed again", removed)
    return removed


def _ids(fs, files: list[str], id_col: str, what: str, id_type: pa.DataType) -> pa.ChunkedArray:
    """The ids of checkpoint or output files (Parquet or JSON Lines); ids of another type than
    the input's are a one-line JobError: the output belongs to another input."""
    tables = [_read(fs, f, [id_col]) for f in files]
    ids = pa.concat_tables(tables).column(0) if tables else pa.chunked_array([], id_type)
    if len(ids) and _kind(ids.type) != _kind(id_type):
        raise JobError(
            f"output.path: the existing {what} has {ids.type} ids but the input's are {id_type}; this output belongs "
            "to another input. Use another output.path, or output.mode=overwrite"
        )
    return ids


def _count_not_in(values: pa.ChunkedArray, others: pa.ChunkedArray) -> int:
    if not len(values):
        return 0
    if not len(others):
        return len(values)
    return len(values) - (pc.sum(pc.is_in(values, value_set=others.combine_chunks())).as_py() or 0)


def _kind(t: pa.DataType) -> str:
    return "integer" if pa.types.is_integer(t) else "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else str(t)


def _blocks(checkpoints: list[str], data: list[str]) -> list[tuple[str | None, list[str]]]:
    """(checkpoint file, the data files it lists) per block. Ray names a block's checkpoint after
    its data files' common prefix; a data file without one (a checkpoint deleted) gets None, a
    checkpoint without data files (its data deleted) gets []."""
    by_base = {posixpath.basename(c)[: -len(".parquet")]: c for c in checkpoints}
    blocks: dict[str, list[str]] = {c: [] for c in checkpoints}
    orphans = []
    for f in data:
        name = posixpath.basename(f)  # "<base>.parquet", "<base>-1.parquet", ...: the longest base that prefixes it
        cuts = (i for i in range(len(name), 0, -1) if name[i - 1] not in "-_." and (i == len(name) or name[i] in "-_."))
        base = next((name[:i] for i in cuts if name[:i] in by_base), None)
        if base is None:
            orphans.append(f)
        else:
            blocks[by_base[base]].append(f)
    return [*blocks.items(), *((None, [f]) for f in orphans)]


class Reconciled(NamedTuple):
    note: str | None  # what was repaired, or None
    output_ids: pa.ChunkedArray | None  # every committed output id; None past the driver's bound


def reconcile(cfg: Config, id_type: pa.DataType, repeats_on_cluster: Callable[[list[str], int], int],
              fence: FenceCheck = None) -> Reconciled:
    """Make the checkpoint agree with the output, block by block.

    The driver holds one block's ids at a time; whether two blocks repeat an id is counted on the
    driver up to `input.driver_id_check_max_rows` output rows (those ids are returned, for
    `all_done`) and by `repeats_on_cluster(files, rows)` (a Ray Data aggregation) beyond. Data files of a
    pending (uncommitted) checkpoint are left out: Ray deletes them when the run starts, and their
    rows run again."""
    id_col = cfg.input.columns.id
    ckpt_fs, root = fsspec_fs(checkpoint_path(cfg), cfg.storage)
    out_fs, _ = fsspec_fs(cfg.output.path, cfg.storage)
    committed, _ = _pending_prefixes(cfg)
    data, _ = split_output(cfg)
    lost = unlisted = rows = 0
    seen: list[pa.Array] | None = []  # every output id while they fit the driver's bound
    stale = []
    for ckpt, files in _blocks(committed, data):
        listed = _ids(ckpt_fs, [ckpt] if ckpt else [], id_col, "checkpoint", id_type)
        written = _ids(out_fs, files, id_col, "output", id_type)
        rows += len(written)
        if seen is not None and rows <= cfg.input.driver_id_check_max_rows:
            seen.extend(written.cast(id_type).chunks)
        else:
            seen = None
        if len(written) and len(listed):
            listed = listed.cast(written.type)
        # Arrow's hash sets, not Python's: a block's ids cost their Arrow bytes.
        missing, extra = _count_not_in(pc.unique(listed), written), _count_not_in(written, listed)
        if missing or extra:
            stale.append((ckpt, files))
            lost, unlisted = lost + missing, unlisted + extra
    output_ids = None if seen is None else pa.chunked_array(seen, id_type)
    if output_ids is not None:
        repeated = rows - pc.count_distinct(output_ids, mode="all").as_py() if rows else 0
    else:
        logger.info("output: checking %d ids for repeats on the cluster", rows)
        repeated = repeats_on_cluster(data, rows)
    if repeated:
        raise JobError(
            f"output.path: {repeated} rows of the existing output repeat an id (two runs wrote it at once?); "
            "remove the repeated files, or rerun with output.mode=overwrite"
        )
    if not stale:
        return Reconciled(None, output_ids)
    ckpt_fs.makedirs(root, exist_ok=True)
    for ckpt, files in stale:  # each block's list replaced atomically: a stop leaves the rest to the next start
        if not files:
            _check(fence)
            ckpt_fs.rm(ckpt)
            continue
        ids = pa.table({id_col: _ids(out_fs, files, id_col, "output", id_type).combine_chunks()})
        stem = posixpath.basename(files[0]).rsplit(".", 1)[0]
        with open_atomic(ckpt_fs, ckpt or posixpath.join(root, f"{stem}.parquet"), fence) as f:
            pq.write_table(ids, f)
    note = (f"checkpoint rebuilt from the output for {len(stale)} blocks: {lost} checkpointed ids had no output row "
            f"(they run again), {unlisted} output rows were missing from the checkpoint (they do not)")
    logger.warning(note)
    return Reconciled(note, output_ids)


def all_done(input_ids: pa.ChunkedArray, output_ids: pa.ChunkedArray) -> bool:
    """Whether every input id has a committed output row (`Reconciled.output_ids`)."""
    return _count_not_in(pc.unique(input_ids.cast(output_ids.type)), output_ids) == 0
