"""Ray Data wiring: the actor classes around Preprocessor and Engine, and their map_batches kwargs.

Between the stages a row is compact Arrow: token ids as int32 bytes and tiles as uint8 bytes
(ARCHITECTURE.md, "Between the stages"). Every input row leaves each stage exactly once; a bad row carries
its `error` through the model stage untouched.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pydantic import ValidationError

from .checkpoint import TORCH, Checkpoint
from .config import Config
from .engines import engine_class, make_engine, model_checkpoint
from .engines.base import is_async, release
from .errors import EngineDead, InputError, PromptTooLong, RowError, describe_validation_error
from .metrics import IMAGES, STAGE_SECONDS, metric
from .preprocess import Preprocessor
from .records import PreparedRequest, Record, Result

logger = logging.getLogger(__name__)

PREPARED_FIELDS = [
    pa.field("_prompt", pa.string()),
    pa.field("_input_ids", pa.large_binary()),  # int32 run values: the image-token runs collapse
    pa.field("_input_id_runs", pa.large_binary()),  # int32 run lengths
    pa.field("_image_tokens", pa.int32()),
    pa.field("_tiles", pa.large_binary()),  # uint8 [total_tiles, 3, H, W]
    pa.field("_tiles_shape", pa.list_(pa.int32())),
    pa.field("_tiles_per_image", pa.list_(pa.int32())),
    pa.field("_image_sizes", pa.list_(pa.int32())),  # h0, w0, h1, w1, ...
    pa.field("_images", pa.list_(pa.large_binary())),  # vLLM: uint8 [H, W, 3] each
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),
]

RESULT_FIELDS = [
    pa.field("text", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("image_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("model", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),  # pipeline.errors.ERROR_KINDS; null on success
]


def _keep(cfg: Config) -> list[str]:
    """Columns carried from input to output: the id and the configured passthrough columns."""
    return [cfg.input.columns.id, *cfg.input.passthrough]


def _runs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run-length encode token ids: each image is hundreds to thousands of one repeated id."""
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return ids[starts].astype(np.int32), np.diff(np.r_[starts, len(ids)]).astype(np.int32)


def prepared_to_row(req: PreparedRequest) -> dict[str, Any]:
    tiles = req.tiles if req.tiles is not None else np.zeros((0,), np.uint8)
    values, lengths = _runs(req.input_ids)
    return {
        "_prompt": req.prompt,
        "_input_ids": values.tobytes(),
        "_input_id_runs": lengths.tobytes(),
        "_image_tokens": req.image_tokens,
        "_tiles": tiles.tobytes(),
        "_tiles_shape": list(tiles.shape),
        "_tiles_per_image": req.tiles_per_image,
        "_image_sizes": [v for hw in req.image_sizes for v in hw],
        "_images": [im.tobytes() for im in req.images],
        "error": None,
        "error_kind": None,
    }


def row_to_prepared(row: dict[str, Any], request_id: Any) -> PreparedRequest:
    sizes = row["_image_sizes"]
    image_sizes = [(sizes[i], sizes[i + 1]) for i in range(0, len(sizes), 2)]
    shape = row["_tiles_shape"]
    tiles = np.frombuffer(row["_tiles"], np.uint8).reshape(shape) if shape and shape[0] else None
    images = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b, (h, w) in zip(row["_images"], image_sizes)]
    return PreparedRequest(
        id=request_id,
        prompt=row["_prompt"],
        input_ids=np.repeat(np.frombuffer(row["_input_ids"], np.int32), np.frombuffer(row["_input_id_runs"], np.int32)),
        image_tokens=row["_image_tokens"],
        tiles=tiles,
        tiles_per_image=list(row["_tiles_per_image"]),
        image_sizes=image_sizes,
        images=images,
    )


class PreprocessStage:
    """CPU actor: input rows -> prepared rows (or rows with `error`).

    Rows of a batch are prepared on `fetch.concurrency` threads (at least one per CPU), so image
    reads from S3 or http(s) overlap (bounded), while one row per CPU of the actor decodes and
    tiles at a time: PIL releases the GIL there, and nothing on that path uses torch or BLAS
    threads that could oversubscribe the CPUs.
    """

    def __init__(self, config: dict, storage_secrets=None):
        from concurrent.futures import ThreadPoolExecutor

        self.cfg = Config.model_validate(config)
        if storage_secrets is not None:  # s3:// images with credentials from the config
            import ray

            self.cfg.storage = self.cfg.storage.model_copy(update=ray.get(storage_secrets))
        cpus = max(1, int(self.cfg.resources.preprocess_cpus))
        self.pre = Preprocessor(self.cfg, Checkpoint.load(self.cfg.model, unused=TORCH), threads=cpus)
        self.pool = ThreadPoolExecutor(max(self.cfg.fetch.concurrency, cpus), thread_name_prefix="prepare")

    def _outcome(self, row: dict[str, Any] | str, work: Callable[[Record], Any]) -> tuple[Any, RowError | None]:
        """`work` on one input row's Record: (its value, None), or (None, the row's error)."""
        try:
            if isinstance(row, str):  # the row could not even be read (see python_rows)
                raise InputError(row)
            return work(Record.from_row(row, self.cfg.input.columns, self.cfg.prompt.template)), None
        except RowError as e:  # the row's own fault, already naming its stage and cause
            return None, e
        except ValidationError as e:  # a column value of the wrong type for a Record
            loc, message = describe_validation_error(e)
            return None, InputError(f"{loc}: {message}")
        except Exception as e:  # anything else is still this row's error, never the batch's
            logger.exception("preprocessing a row failed")
            return None, InputError(f"unexpected {type(e).__name__}: {e}")

    def _prepare(self, row: dict[str, Any] | str) -> dict[str, Any]:
        request, error = self._outcome(row, self.pre.prepare)
        if error is not None:
            return {f.name: None for f in PREPARED_FIELDS} | {"error": str(error), "error_kind": error.kind}
        return prepared_to_row(request)

    def _rows(self, batch: pa.Table) -> list[dict[str, Any] | str]:
        """The columns the Preprocessor reads, as Python values."""
        c = self.cfg.input.columns
        wanted = [c.image, c.image_path, c.prompt, c.messages, *self.cfg.prompt.template_columns()]
        return python_rows(batch, [n for n in dict.fromkeys(wanted) if n in batch.schema.names])

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        prepared = list(self.pool.map(self._prepare, self._rows(batch)))
        images = sum(len(p["_image_sizes"] or ()) // 2 for p in prepared)
        if images:
            metric(IMAGES).inc(images)
        metric(STAGE_SECONDS).observe(time.perf_counter() - start, tags={"stage": "preprocess"})
        return with_columns(batch.select(_keep(self.cfg)), pa.Table.from_pylist(prepared, schema=pa.schema(PREPARED_FIELDS)))


PLAN_FIELDS = [
    pa.field("images", pa.int32()),
    pa.field("image_tokens", pa.int32()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("tiles", pa.int32()),  # what the vision tower runs on (1 per LLaVA image)
    pa.field("predicted_error", pa.string()),
    pa.field("predicted_error_kind", pa.string()),
]


class PlanStage(PreprocessStage):
    """CPU actor of `llava-ray plan`: input rows -> each row's counts and the error the job
    would give it, through `Preprocessor.count` (the same path as `prepare`, image headers
    only). `sample`: the ids to plan; the other rows are dropped here."""

    def __init__(self, config: dict, storage_secrets=None, sample: list | None = None):
        super().__init__(config, storage_secrets)
        self.sample = None if sample is None else pa.array(sample)

    def _plan(self, row: dict[str, Any] | str) -> dict[str, Any]:
        count, error = self._outcome(row, self.pre.count)
        if count is not None:
            try:
                self.pre.check_length(count)
            except PromptTooLong as e:  # counted, but over the context: the row keeps its count
                error = e
        return {
            "images": len(count.image_sizes) if count else None,
            "image_tokens": count.image_tokens if count else None,
            "prompt_tokens": count.prompt_tokens if count else None,
            "tiles": sum(count.tiles_per_image) if count else None,
            "predicted_error": str(error) if error else None,
            "predicted_error_kind": error.kind if error else None,
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.sample is not None:
            ids = batch.column(self.cfg.input.columns.id)
            batch = batch.filter(pc.is_in(ids, value_set=self.sample.cast(ids.type)))
        planned = list(self.pool.map(self._plan, self._rows(batch)))
        ids = batch.select([self.cfg.input.columns.id])
        return with_columns(ids, pa.Table.from_pylist(planned, schema=pa.schema(PLAN_FIELDS)))


def python_rows(batch: pa.Table, columns: list[str]) -> list[dict[str, Any] | str]:
    """`columns` of each row as Python values. A value that cannot be converted (a string column
    holding invalid UTF-8, say) costs only its own row: that row becomes a one-line error naming
    the column, instead of the batch's conversion failing and taking every row with it."""
    table = batch.select(columns)
    try:
        return table.to_pylist()
    except Exception:  # find the rows at fault, value by value
        pass
    rows: list[dict[str, Any] | str] = []
    for i in range(table.num_rows):
        row: dict[str, Any] | str = {}
        for name in columns:
            try:
                row[name] = table.column(name)[i].as_py()
            except Exception as e:
                reason = "invalid UTF-8" if isinstance(e, UnicodeDecodeError) else f"{type(e).__name__}: {e}"
                row = f"column {name!r}: cannot read the value ({reason})"
                break
        rows.append(row)
    return rows


def with_columns(kept: pa.Table, added: pa.Table) -> pa.Table:
    """The input's own columns, untouched Arrow (never converted to Python), beside the stage's."""
    for field in added.schema:
        kept = kept.append_column(field, added.column(field.name))
    return kept


class GenerateStage:
    """Model actor: prepared rows -> result rows, one per input row, in order."""

    def __init__(self, config: dict):
        self.cfg = Config.model_validate(config)
        self.engine = make_engine(self.cfg, model_checkpoint(self.cfg))

    def __del__(self):
        """Ray Data drops the actor's UDF on a graceful stop: the engine goes with it (vLLM's
        worker processes would otherwise outlive the actor)."""
        release(getattr(self, "engine", None))  # None when __init__ failed before the engine

    @staticmethod
    def _exit(error: EngineDead) -> None:
        """A retried task would land on this same dead engine: exit so Ray Data restarts the actor."""
        logger.error("the engine cannot run again in this process (%s); exiting so Ray Data restarts this actor", error)
        os._exit(1)

    def _requests(self, batch: pa.Table) -> tuple[list[dict], list[tuple[int, PreparedRequest]]]:
        rows = batch.select([f.name for f in PREPARED_FIELDS]).to_pylist()  # ours: always valid
        return rows, [(i, row_to_prepared(r, i)) for i, r in enumerate(rows) if r["error"] is None]

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        rows, todo = self._requests(batch)
        try:
            generated = self.engine.generate([p for _, p in todo], self.cfg.generation)
        except EngineDead as e:  # a CUDA error poisoned the device (engines.base.poisons_device)
            self._exit(e)
        metric(STAGE_SECONDS).observe(time.perf_counter() - start, tags={"stage": "generate"})
        return self._table(batch, rows, todo, generated)

    def _table(self, batch: pa.Table, rows: list[dict], todo: list, generated: list[Result]) -> pa.Table:
        results: list[Result | None] = [None] * len(rows)
        for (i, _), res in zip(todo, generated):
            results[i] = res
        out = []
        for i, (row, res) in enumerate(zip(rows, results)):
            res = res or Result.failed(i, row["error"], kind=row["error_kind"])
            out.append({
                "text": res.text,
                "finish_reason": res.finish_reason,
                "prompt_tokens": res.prompt_tokens,
                "image_tokens": res.image_tokens,
                "completion_tokens": res.completion_tokens,
                "model": self.engine.model_name,
                "backend": self.engine.backend,
                "error": res.error,
                "error_kind": res.error_kind,
            })
        return with_columns(batch.select(_keep(self.cfg)), pa.Table.from_pylist(out, schema=pa.schema(RESULT_FIELDS)))


class AsyncGenerateStage(GenerateStage):
    """vLLM: Ray Data runs up to `vllm.batches_in_flight` calls of this async __call__ at once per
    actor (max_concurrency, as Ray's own ray.data.llm vLLM stage does); vLLM's continuous
    batching overlaps the next batch's prefill with the last one's decode."""

    async def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        rows, todo = self._requests(batch)
        try:
            generated = await self.engine.agenerate([p for _, p in todo], self.cfg.generation)
        except EngineDead as e:
            self._exit(e)
        metric(STAGE_SECONDS).observe(time.perf_counter() - start, tags={"stage": "generate"})
        return self._table(batch, rows, todo, generated)


class DropRepeatedIds:
    """One actor sees every row, so 'first one wins' needs only the set of repeated ids. The
    batch's ids stay Arrow; only the rows holding a repeated id are looked at one by one."""

    def __init__(self, id_column: str, repeated: list):
        self.id_column = id_column
        self.repeated = pa.array(repeated)
        self.seen: set = set()

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column(self.id_column)
        rows = np.flatnonzero(pc.is_in(ids, value_set=self.repeated.cast(ids.type)).to_numpy(zero_copy_only=False))
        if not len(rows):
            return batch
        keep = np.ones(batch.num_rows, dtype=bool)
        for i, value in zip(rows, ids.take(pa.array(rows)).to_pylist()):
            keep[i] = value not in self.seen
            self.seen.add(value)
        return batch.filter(pa.array(keep))


def _pool(actors: int):
    """A fixed-size actor pool (Ray Data's `compute`; `concurrency=` is deprecated)."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=actors)


def input_rows(cfg: Config, ds, repeated: list):
    """The input's Dataset as the CPU stage takes it (the job's and the plan's): rows that repeat
    an id dropped (input.duplicate_ids: keep_first; the caller preserves order), and small blocks,
    which bound what a stop loses (output and checkpoints are committed per block)."""
    if repeated:
        ds = ds.map_batches(DropRepeatedIds, fn_constructor_kwargs={"id_column": cfg.input.columns.id, "repeated": repeated},
                            batch_format="pyarrow", compute=_pool(1), num_cpus=0.1)
    return ds.repartition(target_num_rows_per_block=cfg.resources.rows_per_block)


# Actor restarts and task retries: Ray Data's defaults (restart forever, retry tasks) are what a
# long job wants, so they are not overridden here.
def _actor_pool_kwargs(cfg: Config, batch_size: int, actors: int, cpus: float, gpus: float, resources: dict,
                       **secrets) -> dict[str, Any]:
    """The constructor gets the config without its secrets (Ray shows actor arguments in its
    dashboard and task specs); a secret the actor needs goes by reference (`_by_reference`)."""
    return dict(
        fn_constructor_kwargs={"config": cfg.without_secrets().model_dump(), **secrets},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=_pool(actors),
        num_cpus=cpus,
        num_gpus=gpus or None,
        resources=resources or None,
    )


def _by_reference(secret: dict | None):
    """A secret as an object in Ray's object store: the actor's arguments hold only its
    reference, and the actor reads the value. The driver holds the reference for the whole job,
    so a restarted actor reads it again. Credentials from the environment (the AWS variables, a
    Kubernetes Secret) need none of this: the actor's process has them itself."""
    if not secret:
        return None
    import ray

    return ray.put(secret)


def object_store_budget(cfg: Config, limits):
    """The streaming executor's object-store budget (Ray Data's `resource_limits`): rows that the
    CPU stage prepares faster than the model consumes wait in the object store, and without a
    bound that queue grows with the input (to a share of the store), and the job's memory with it."""
    per_actor = cfg.resources.object_store_mb_per_model_actor
    if per_actor is None:
        return limits
    return limits.copy(object_store_memory=per_actor * cfg.resources.model_actors * 1024**2)


def preprocess_kwargs(cfg: Config, **extra) -> dict[str, Any]:
    """Only this stage (and the plan's, `extra`: its sample) reads with the storage credentials
    (s3:// images); the model stage has no use for any secret."""
    r = cfg.resources
    return _actor_pool_kwargs(cfg, r.preprocess_batch_size, r.preprocess_actors, r.preprocess_cpus, 0,
                              r.preprocess_resources, storage_secrets=_by_reference(cfg.secrets().get("storage")),
                              **extra)


def generate_stage(cfg: Config) -> type[GenerateStage]:
    """Ray Data runs an async __call__ with batches in flight: the stage follows the engine's type."""
    return AsyncGenerateStage if is_async(engine_class(cfg)) else GenerateStage


def generate_kwargs(cfg: Config) -> dict[str, Any]:
    r = cfg.resources
    kwargs = _actor_pool_kwargs(cfg, r.model_batch_size, r.model_actors, r.model_cpus, r.num_gpus_per_actor,
                                r.model_resources)
    if generate_stage(cfg) is AsyncGenerateStage:
        n = cfg.vllm.batches_in_flight
        if r.model_batch_size * n < cfg.vllm.max_num_seqs:
            logger.warning(
                "resources.model_batch_size %d x vllm.batches_in_flight %d < vllm.max_num_seqs %d: "
                "the engine runs below capacity", r.model_batch_size, n, cfg.vllm.max_num_seqs,
            )
        kwargs["max_concurrency"] = n
    return kwargs
