"""The offline job: build the Dataset from a Config, run it, resume, summarise."""

from __future__ import annotations

import datetime as dt
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from . import manifest
from .checkpoint import Checkpoint
from .checks import check_environment
from .cluster import METRICS_REPORT_S, init_ray
from .config import Config
from .errors import JobError
from .stages import PreprocessStage, generate_kwargs, generate_stage, input_rows, object_store_budget, preprocess_kwargs
from .inputs import InputPlan, check_ids_on_cluster, inspect_input
from .lease import Lease
from .outputs import check_no_overlap, check_writable
from .progress import Progress, Reporter, Tally, tally
from .readers import open_input, output_repeats
from .resume import all_done, checkpoint_path, drop_failed_rows, finish_commits, reconcile, split_output
from .storage import arrow_fs, output_batches, remove_tree

logger = logging.getLogger(__name__)


class JobSummary(BaseModel):
    output_path: str
    rows_total: int  # rows in the output (all runs)
    rows_ok: int
    rows_failed: int
    failed_by_kind: dict[str, int] = {}  # all runs, by pipeline.errors.ERROR_KINDS
    rows_processed: int  # by this run
    seconds: float
    records_per_s: float
    generated_tokens: int  # by this run
    tokens_per_s: float
    dropped_duplicates: int = 0
    model: str | None = None  # as the output rows record it
    backend: str | None = None  # transformers/<dtype>/<attention>[/bnb-...] or vllm/<dtype>
    manifest: str | None = None  # where this run's entry was appended


def build_dataset(cfg: Config, plan: InputPlan):
    ds = input_rows(cfg, plan.reader.dataset(plan.columns, plan.schema), plan.repeated_ids)
    ds = ds.map_batches(PreprocessStage, **preprocess_kwargs(cfg))
    return ds.map_batches(generate_stage(cfg), **generate_kwargs(cfg))


def run_job(cfg: Config, *, retry_failed: bool | list[str] = False) -> JobSummary:
    """Check everything that can be known before Ray starts (one-line errors), take the output's
    lease, then run. `retry_failed`: rerun failed rows first (True: all; a list: those error
    kinds). ARCHITECTURE.md, "Job start, resume and the one writer", says what a rerun does."""
    checkpoint, plan = preflight(cfg)
    # The lease before Ray: a second run on a held output refuses (or waits) without starting one.
    with Lease(cfg) as lease:
        init_ray(cfg)
        plan = check_ids_on_cluster(cfg, plan)  # a large input's ids: before the output is touched
        return _run(cfg, plan, checkpoint, retry_failed, lease)


def preflight(cfg: Config) -> tuple[Checkpoint, InputPlan]:
    """Everything that can be known before Ray starts, each failure one line (ConfigError or
    JobError): the environment and checkpoint, input and output locations, the input's files."""
    if cfg.input is None or cfg.output is None:
        raise JobError("a job needs `input` and `output` sections (input.path, output.path)")
    checkpoint = check_environment(cfg)
    reader = open_input(cfg)
    check_no_overlap(cfg, reader.files)  # before anything is read, written or deleted (output.mode: overwrite)
    plan = inspect_input(cfg, reader)
    check_writable(cfg)
    return checkpoint, plan


def _run(cfg: Config, plan: InputPlan, checkpoint: Checkpoint, retry_failed: bool | list[str], lease: Lease) -> JobSummary:
    fence = lease.fence()  # every change to the output and its checkpoint: only while this run holds it
    if cfg.output.mode == "overwrite":
        fence()
        remove_tree(cfg.output.path, cfg.storage)
        remove_tree(checkpoint_path(cfg), cfg.storage)
        output_ids = None
    else:
        finish_commits(cfg, fence)
        if retry_failed:
            drop_failed_rows(cfg, None if retry_failed is True else list(retry_failed), fence)
        # every committed output id, when reconcile read them within the driver's bound (else None)
        output_ids = reconcile(cfg, plan.id_type, lambda files, rows: output_repeats(cfg, files, plan.id_type, rows), fence).output_ids
    # Data files of a block whose commit a stop interrupted are deleted by Ray Data at start
    # (their rows run again): they are neither done before this run nor written by it.
    committed, uncommitted = split_output(cfg)
    before = tally(cfg, committed)
    progress = Progress(cfg, before, total=plan.rows - plan.dropped_duplicates, ignore=uncommitted)
    started, start = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    if not uncommitted and _finished(plan, output_ids):
        # A finished job rerun (a RayJob retried after success, say): no actor starts, no model loads.
        logger.info("output.path: every input id already has its output row; nothing to run")
    else:
        _execute(cfg, plan, lease, progress)
    lease.check()  # taken over while the last blocks ran: another run owns the output now
    seconds = time.perf_counter() - start
    whole = before + progress.run
    summary = summarize(cfg, whole, progress.run, seconds, plan.dropped_duplicates)
    record = manifest.entry(cfg, checkpoint, started, seconds, whole, progress.run, summary.backend)
    summary.manifest = manifest.append(cfg, record, fence)
    if cfg.observability.metrics_port:  # one more export, so a scrape sees the final counts
        time.sleep(2 * METRICS_REPORT_S)
    return summary


def _finished(plan: InputPlan, output_ids: pa.ChunkedArray | None) -> bool:
    """Every input id has a committed output row: decided on the driver with the ids its input and
    output checks already read, within `input.driver_id_check_max_rows` (a larger input or output,
    or `duplicate_ids: trust`, runs, and Ray Data's checkpoint filter passes nothing through)."""
    if plan.ids is None or output_ids is None or len(output_ids) < plan.rows - plan.dropped_duplicates:
        return False
    return all_done(plan.ids, output_ids)


def _execute(cfg: Config, plan: InputPlan, lease: Lease, progress: Progress) -> None:
    """The Dataset run: Ray Data's checkpointing keyed on the id column, the object-store budget,
    and the output published through the lease's fence."""
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    ctx = DataContext.get_current()
    ckpt_fs, ckpt_path = arrow_fs(checkpoint_path(cfg), cfg.storage)
    ctx.checkpoint_config = CheckpointConfig(
        id_column=cfg.input.columns.id,
        checkpoint_path=ckpt_path,
        override_filesystem=ckpt_fs,
        delete_checkpoint_on_success=False,  # a finished job re-run must process nothing
    )
    # keep_first: the one drop actor must see rows in the input's order (files as listed, a
    # folder or glob sorted by path; rows in file order), not in the order reads finish.
    ordered, limits = ctx.execution_options.preserve_order, ctx.execution_options.resource_limits
    ctx.execution_options.preserve_order = ordered or bool(plan.repeated_ids)
    ctx.execution_options.resource_limits = object_store_budget(cfg, limits)
    out_fs, out_path = arrow_fs(cfg.output.path, cfg.storage, fence=lease.fence())
    try:
        with Reporter(progress, cfg.observability.progress_interval_s), plan.reader.reading():
            ds = build_dataset(cfg, plan)
            write = ds.write_json if cfg.output.format == "jsonl" else ds.write_parquet
            write(out_path, filesystem=out_fs)
    except Exception:
        lease.check()  # a write refused by the fence: say that in one line, not Ray's traceback
        raise
    finally:
        ctx.checkpoint_config = None
        ctx.execution_options.preserve_order = ordered
        ctx.execution_options.resource_limits = limits


def summarize(cfg: Config, whole: Tally, run: Tally, seconds: float, dropped: int) -> JobSummary:
    """Totals over the whole output; rates over the files this run wrote (a resumed run's
    earlier files are not its work)."""
    batches = output_batches(cfg.output.path, cfg.storage, ["model", "backend"], run.files)
    labelled = (b.filter(pc.is_valid(b.column("backend"))) for b in batches if "backend" in b.column_names)
    ran = next((t.slice(0, 1).to_pylist() for t in labelled if t.num_rows), [])  # the first labelled row
    return JobSummary(
        output_path=cfg.output.path,
        rows_total=whole.rows,
        rows_ok=whole.ok,
        rows_failed=whole.failed,
        failed_by_kind=dict(sorted(whole.by_kind.items())),
        rows_processed=run.rows,
        seconds=round(seconds, 3),
        records_per_s=round(run.rows / seconds, 3) if seconds else 0.0,
        generated_tokens=run.generated_tokens,
        tokens_per_s=round(run.generated_tokens / seconds, 3) if seconds else 0.0,
        dropped_duplicates=dropped,
        model=ran[0]["model"] if ran else None,
        backend=ran[0]["backend"] if ran else None,
    )
