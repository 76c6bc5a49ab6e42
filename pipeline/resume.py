"""Resume bookkeeping on top of Ray Data's checkpointing (`DataContext.checkpoint_config`).

Ray writes one checkpoint file (the ids of a block) per output data file, with a two-phase
commit: `<prefix>.pending.parquet` before the data file `<prefix>-<n>.parquet`, renamed to
`<prefix>.parquet` after it. A re-run skips committed ids and deletes the data files of
uncommitted blocks. For `--retry-failed`, this module removes failed rows from both sides of each pair.
"""

from __future__ import annotations

import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config
from .storage import fsspec_fs, open_atomic

logger = logging.getLogger(__name__)

PENDING = ".pending.parquet"


def checkpoint_path(cfg: Config) -> str:
    """Beside the output, not inside it, so readers of the output never see checkpoint files."""
    return cfg.output.path.rstrip("/") + ".checkpoint"


def _committed_files(cfg: Config) -> tuple[object, list[str]]:
    fs, root = fsspec_fs(checkpoint_path(cfg), cfg.storage)
    if not fs.exists(root):
        return fs, []
    return fs, sorted(p for p in fs.find(root) if p.endswith(".parquet") and not p.endswith(PENDING))


def _rewrite(fs, path: str, table: pa.Table) -> None:
    with open_atomic(fs, path) as f:
        pq.write_table(table, f)


def drop_failed_rows(cfg: Config) -> int:
    """Remove rows with an `error` from the output and their ids from the checkpoint, so the
    next run processes them again. Returns how many rows were removed."""
    id_col = cfg.input.columns.id
    out_fs, out_root = fsspec_fs(cfg.output.path, cfg.storage)
    ckpt_fs, ckpt_files = _committed_files(cfg)
    if not out_fs.exists(out_root):
        return 0
    checkpoints = {posixpath.basename(p)[: -len(".parquet")]: p for p in ckpt_files}
    removed = 0
    for path in sorted(p for p in out_fs.find(out_root) if p.endswith(".parquet")):
        table = pq.read_table(out_fs.open(path, "rb"))
        failed = pc.is_valid(table.column("error"))
        n_failed = pc.sum(failed.cast("int64")).as_py() or 0
        if not n_failed:
            continue
        # Data first, then its checkpoint: a stop in between leaves ids that are checkpointed but
        # absent, which the next --retry-failed cannot see; the reverse would duplicate rows.
        failed_ids = table.filter(failed).column(id_col)
        _rewrite(out_fs, path, table.filter(pc.invert(failed)))
        prefix = posixpath.basename(path).rsplit("-", 1)[0]
        if prefix in checkpoints:
            ckpt = pq.read_table(ckpt_fs.open(checkpoints[prefix], "rb"))
            keep = pc.invert(pc.is_in(ckpt.column(id_col), value_set=failed_ids))
            _rewrite(ckpt_fs, checkpoints[prefix], ckpt.filter(keep))
        removed += n_failed
    logger.info("retry-failed: %d rows will be processed again", removed)
    return removed
