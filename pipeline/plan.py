"""`llava-ray plan`: what a job will cost, and which rows will fail, before it starts.

The input is read with the job's own Reader and start-up checks, and every row (or a uniform
sample) goes through the job's CPU stage code with image headers instead of decoded pixels
(`stages.PlanStage`, `Preprocessor.count`): the same checks, chat template and token ids.
The totals, the settings the largest row needs and the model FLOPs priced on a table of GPUs
(`pipeline/flops.py`, `plan` in pipeline/config.py) are computed here; the CLI prints them.
No GPU is needed or looked for: a plan runs on the laptop that writes the config.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from .checkpoint import Checkpoint
from .checks import check_vllm_settings
from .cluster import init_ray
from .config import Config
from .errors import ConfigError, JobError
from .flops import ModelFlops
from .inputs import InputPlan, check_ids_on_cluster, inspect_input
from .readers import open_input
from .storage import arrow_fs
from .stages import PLAN_FIELDS, PlanStage, input_rows, preprocess_kwargs

logger = logging.getLogger(__name__)


class LargestRow(BaseModel):
    id: str
    prompt_tokens: int
    image_tokens: int
    images: int


class Needs(BaseModel):
    """The settings the input needs so that no row fails for length or image count."""

    max_model_len: int  # the largest row's prompt + generation.max_new_tokens
    max_images_per_row: int  # = vllm.limit_mm_per_prompt for backend vllm
    fits_model: bool  # max_model_len within the checkpoint's context


class Flops(BaseModel):
    """Model FLOPs of the rows predicted to run (scaled up from a sample), by part."""

    vision: float
    projector: float
    prefill: float
    decode: float
    total: float


class GpuTime(BaseModel):
    gpu: str
    peak_tflops: float  # dense bf16
    gpu_hours: float  # total FLOPs / (peak x mfu)
    hours: float  # wall time on resources.model_actors GPUs of this kind


class PlanReport(BaseModel):
    model: str
    family: str
    backend: str
    rows: int  # input rows the job would run (repeated ids dropped)
    rows_planned: int  # rows read: all, or the sample
    sampled: bool  # totals below are the sample's, scaled by rows / rows_planned
    scale: float
    rows_ok: int
    rows_failed: int
    failed_by_kind: dict[str, int]
    images: int  # of the rows that would run
    tiles: int  # what the vision tower runs on (1 per LLaVA image; AnyRes: base + grid)
    image_tokens: int
    text_tokens: int
    prompt_tokens: int
    max_new_tokens: int  # generation.max_new_tokens
    new_tokens: int  # max_new_tokens x rows_ok: at most this many generated
    largest_row: LargestRow | None
    needs: Needs | None
    context_len: int  # the model's (vllm.max_model_len when lower, for backend vllm)
    flops: Flops
    mfu: float
    model_actors: int  # resources.model_actors: the GPUs the wall times assume, one per actor
    gpus: list[GpuTime]
    seconds: float  # this plan's own time
    rows_per_s: float


def plan_job(cfg: Config, sample: int | None = None) -> tuple[PlanReport, pa.Table]:
    """The plan of `cfg`'s job, and its per-row table (the id and stages.PLAN_FIELDS); ConfigError or
    JobError (one line) before Ray starts, as `run` would."""
    if cfg.input is None:
        raise JobError("a plan needs an `input` section (input.path)")
    start = time.perf_counter()
    checkpoint = Checkpoint.load(cfg.model)
    if cfg.backend == "vllm":
        check_vllm_settings(cfg, checkpoint)
    inputs = inspect_input(cfg, open_input(cfg))
    init_ray(cfg)
    inputs = check_ids_on_cluster(cfg, inputs)  # a large input's ids, as `run` checks them
    rows = inputs.rows - inputs.dropped_duplicates
    chosen = _sample(cfg, inputs, sample) if sample is not None and sample < rows else None
    import ray
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    ordered = options.preserve_order
    options.preserve_order = ordered or bool(inputs.repeated_ids)  # keep_first: the first in input order
    try:
        ds = input_rows(cfg, inputs.reader.dataset(inputs.columns, inputs.schema), inputs.repeated_ids)
        ds = ds.map_batches(PlanStage, **preprocess_kwargs(cfg, sample=chosen))
        with inputs.reader.reading():
            tables = ray.get(ds.to_arrow_refs())
    finally:
        options.preserve_order = ordered
    id_field = inputs.schema.field(cfg.input.columns.id)
    per_row = pa.concat_tables(tables) if tables else pa.schema([id_field, *PLAN_FIELDS]).empty_table()
    report = summarize(cfg, checkpoint, per_row, rows, time.perf_counter() - start)
    return report, per_row


def _sample(cfg: Config, inputs: InputPlan, n: int) -> list:
    """`n` distinct ids drawn uniformly (seeded: plan.seed), as Python values."""
    if n < 1:
        raise ConfigError("--sample", f"{n}: sample at least one row")
    ids = pc.unique(inputs.ids if inputs.ids is not None else inputs.reader.ids(cfg.input.columns.id))  # read once
    picked = np.random.default_rng(cfg.plan.seed).choice(len(ids), size=n, replace=False)
    return ids.take(pa.array(np.sort(picked))).to_pylist()


def summarize(cfg: Config, checkpoint: Checkpoint, per_row: pa.Table, rows: int, seconds: float) -> PlanReport:
    """Totals over the per-row table, scaled to `rows` when it holds a sample."""
    planned = per_row.num_rows
    scale = rows / planned if planned else 1.0
    ok = per_row.filter(pc.is_null(per_row.column("predicted_error")))
    kinds = pc.value_counts(per_row.column("predicted_error_kind").drop_null()).to_pylist()
    counted = per_row.filter(pc.is_valid(per_row.column("prompt_tokens")))
    column = lambda t, name: t.column(name).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
    scaled = lambda x: int(round(float(x) * scale))  # noqa: E731

    g = cfg.generation.max_new_tokens
    model = ModelFlops.read(checkpoint.config)
    prompt = column(ok, "prompt_tokens")
    tiles = column(ok, "tiles")
    parts = {
        "vision": float(tiles.sum()) * model.vision_per_tile,
        "projector": float(tiles.sum()) * model.projector_per_tile,
        "prefill": float(model.prefill(prompt).sum()),
        "decode": float(model.decode(prompt, g).sum()),
    }
    flops = Flops(**{k: v * scale for k, v in parts.items()}, total=sum(parts.values()) * scale)
    context = cfg.context_limit(checkpoint.context_len)
    largest = needs = None
    if counted.num_rows:
        i = int(np.argmax(column(counted, "prompt_tokens")))
        big = counted.slice(i, 1).to_pylist()[0]
        largest = LargestRow(id=str(big[cfg.input.columns.id]), prompt_tokens=big["prompt_tokens"],
                             image_tokens=big["image_tokens"], images=big["images"])
        need = largest.prompt_tokens + g
        needs = Needs(max_model_len=need, max_images_per_row=int(column(counted, "images").max()),
                      fits_model=need <= checkpoint.context_len)
    actors = cfg.resources.model_actors
    gpus = []
    for name, peak in cfg.plan.gpus.items():
        hours = flops.total / (peak * 1e12 * cfg.plan.mfu) / 3600
        gpus.append(GpuTime(gpu=name, peak_tflops=peak, gpu_hours=hours, hours=hours / actors))
    image_tokens = column(ok, "image_tokens").sum()
    return PlanReport(
        model=checkpoint.name, family=checkpoint.family.name, backend=cfg.backend,
        rows=rows, rows_planned=planned, sampled=planned < rows, scale=scale,
        rows_ok=scaled(ok.num_rows), rows_failed=rows - scaled(ok.num_rows),
        failed_by_kind={k["values"]: scaled(k["counts"]) for k in sorted(kinds, key=lambda k: k["values"])},
        images=scaled(column(ok, "images").sum()), tiles=scaled(tiles.sum()),
        image_tokens=scaled(image_tokens), text_tokens=scaled(prompt.sum() - image_tokens), prompt_tokens=scaled(prompt.sum()),
        max_new_tokens=g, new_tokens=scaled(ok.num_rows * g),
        largest_row=largest, needs=needs, context_len=context,
        flops=flops, mfu=cfg.plan.mfu, model_actors=actors, gpus=gpus,
        seconds=round(seconds, 3), rows_per_s=round(planned / seconds, 3) if seconds else 0.0,
    )


def write_rows(per_row: pa.Table, path: str, cfg: Config) -> None:
    """The per-row table as one Parquet file at `path` (local or s3://), written whole or not at all."""
    import pyarrow.parquet as pq

    fs, where = arrow_fs(path, cfg.storage)
    pq.write_table(per_row, where, filesystem=fs)
