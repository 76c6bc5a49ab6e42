"""Typed configuration for a job and for the endpoint: one YAML file, validated here.

Every model forbids unknown keys (a typo is an error) and each default lives here only;
YAML and `--set a.b=c` override.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, describe_validation_error, first_line


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizationConfig(_Strict):
    """bitsandbytes settings, as on the LLaVA model cards (transformers backend only)."""

    mode: Literal["none", "4bit", "8bit"] = "none"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    bnb_4bit_use_double_quant: bool = False
    # LLaVA users keep the vision tower and projector in full precision. Full module paths:
    # transformers matches them from the start of a module's name (or as a suffix).
    skip_modules: list[str] = Field(
        default_factory=lambda: ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    )


class ModelConfig(_Strict):
    name: str = Field(description="hub id, local path, or a preset short name (pipeline.layouts.PRESETS)")
    family: Literal["auto", "llava", "llava_next"] = "auto"
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    # torch threads in the model actor; None = the actor's CPU request (at least 1).
    torch_threads: int | None = Field(default=None, ge=1)


class GenerationConfig(_Strict):
    """Sampling settings; temperature 0 means greedy."""

    max_new_tokens: int = Field(default=64, ge=1, le=8192)
    min_new_tokens: int = Field(default=0, ge=0)  # benchmarks force a fixed length (= max_new_tokens)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)  # what torch and vLLM take
    stop: list[str] = Field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):  # "" occurs everywhere: it would end every answer at once
            raise ValueError("stop strings must not be empty")
        return stop

    @model_validator(mode="after")
    def _min_le_max(self) -> "GenerationConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
        return self


class PromptConfig(_Strict):
    default: str = "Describe this image in one sentence."
    system: str | None = None
    # The prompt of a row without its own `prompt`, formatted from the row's columns (instead of
    # `default`): "The alt text is: {TEXT}. Write a detailed caption."; `{meta.title}` is a field
    # of a struct (JSON object) column. A row where a named field is missing or null: row error.
    template: str | None = None

    @field_validator("template")
    @classmethod
    def _fields_named(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)
        return value

    def template_columns(self) -> list[str]:
        """The input columns the template reads (each field's first part)."""
        return list(dict.fromkeys(f.split(".")[0] for f in template_fields(self.template))) if self.template else []


def template_fields(template: str) -> list[str]:
    """The fields a prompt template names (`{TEXT}`, `{meta.title}`); ConfigError unless every
    replacement field names one (no `{}`, `{0}` or `{a[0]}`) and the braces balance."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError("prompt.template", f"{template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    bad = [f for f in fields if not f or f[0].isdigit() or "[" in f or "" in f.split(".")]
    if bad:
        raise ConfigError("prompt.template", f"{template!r}: {{{bad[0]}}} names no column; fields are column names, "
                          "or column.field for a field of a struct column")
    return fields


class ColumnsConfig(_Strict):
    """Input column names. Exactly one of image / image_path should exist in the data."""

    id: str = "id"
    image: str = "image"  # binary: encoded bytes (or a list of them)
    image_path: str = "image_path"  # string: local path, s3://, http(s):// (or a list of them)
    prompt: str = "prompt"
    messages: str = "messages"  # OpenAI-style conversation as a JSON string


class StorageConfig(_Strict):
    """fsspec / pyarrow filesystem options for s3:// (and S3-compatible stores).

    Credentials come from the standard AWS environment variables unless given here; they are
    never logged or written to output.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    key: str | None = Field(default=None, repr=False)
    secret: str | None = Field(default=None, repr=False)


class WebDatasetConfig(_Strict):
    # A sample's image: its first member with one of these extensions (others are not read).
    image_keys: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"], min_length=1)


class InputConfig(_Strict):
    path: str | list[str]
    # auto: by the files' extensions (.parquet, .jsonl/.json/.ndjson, .csv, .tar, image files), said in the log.
    format: Literal["auto", "parquet", "json", "csv", "images", "webdataset"] = "auto"
    webdataset: WebDatasetConfig = Field(default_factory=WebDatasetConfig)
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    passthrough: list[str] = Field(default_factory=list)
    # error: a repeated id stops the job at start; keep_first: the first row in input order wins;
    # trust: the input is known to be unique, nothing is checked (no pass over the ids at all).
    duplicate_ids: Literal["error", "keep_first", "trust"] = "error"
    # Inputs of up to this many rows have their ids checked on the driver (fast, ~100 MB per 1M
    # ids); larger ones by a Ray Data aggregation on the cluster, the driver holding only repeats.
    driver_id_check_max_rows: int = Field(default=1_000_000, ge=0)

    @field_validator("path")
    @classmethod
    def _some_path(cls, value: str | list[str]) -> str | list[str]:
        paths = [value] if isinstance(value, str) else value
        if not paths or not all(p.strip() for p in paths):
            raise ConfigError("input.path", f"{value!r}: give an input file, folder, glob or URL, or a non-empty list of them")
        return value


class OutputConfig(_Strict):
    path: str
    mode: Literal["resume", "overwrite"] = "resume"
    # parquet, or jsonl (JSON Lines, one object per row; files named .json as Ray writes them)
    format: Literal["parquet", "jsonl"] = "parquet"
    # A crashed run's lease on the output expires after this long without a heartbeat (one every
    # expiry / 3): 90 s lets a holder miss two beats (a slow store, a long pause) before another
    # run may take over, and is what a RayJob retry on another pod waits at most.
    lease_expiry_s: float = Field(default=90.0, ge=5.0)
    # How long a new run waits for a lease whose holder (elsewhere) may have stopped beating
    # before it refuses; None: the expiry, so a RayJob retry after a lost pod just proceeds.
    lease_wait_s: float | None = Field(default=None, ge=0.0)


class ResourcesConfig(_Strict):
    """Actor pools. Two-core machines need fractional CPU requests (ARCHITECTURE.md, "Two cores")."""

    preprocess_actors: int = Field(default=1, ge=1)
    preprocess_cpus: float = Field(default=0.5, gt=0)
    preprocess_batch_size: int = Field(default=16, ge=1)
    model_actors: int = Field(default=1, ge=1)
    model_cpus: float = Field(default=0.5, ge=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    model_batch_size: int = Field(default=8, ge=1)
    # Bounds the rows per Ray Data block, which bounds what a stop can lose (ARCHITECTURE.md,
    # "Job start, resume and the one writer").
    rows_per_block: int = Field(default=128, ge=1, le=2048)
    # Custom Ray resources each actor of a pool asks for, to place the pool on a node group: e.g.
    # {"model_node": 1} with the GPU workers started with `--resources='{"model_node": 8}'`.
    preprocess_resources: dict[str, float] = Field(default_factory=dict)
    model_resources: dict[str, float] = Field(default_factory=dict)
    # The job's object-store budget per model actor (MiB): bounds the prepared rows queued for
    # the model, so memory stays flat however many rows the input has (benchmarks/offline.py
    # --plateau); None: Ray Data's default, a share of the cluster's object store.
    object_store_mb_per_model_actor: int | None = Field(default=256, ge=16)


class LimitsConfig(_Strict):
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=1)
    max_aspect_ratio: float = Field(default=50.0, ge=1.0)
    max_images_per_row: int = Field(default=4, ge=1)
    # None = the model's context length; prompt tokens + max_new_tokens must fit.
    max_prompt_tokens: int | None = Field(default=None, ge=1)


class PreprocessConfig(_Strict):
    """How the CPU stage turns a photo into what the model sees (README, "Image preprocessing")."""

    # false: a large photo is decoded at reduced scale and resized from there (pipeline/pixels.py:
    # bit-identical under 2.8x the model's input size, within 1 uint8 level on average above).
    # true: the checkpoint's processor on the fully decoded photo, bit-identical always; a 12 MP
    # photo then takes 9-10x the CPU (benchmarks/preprocess.py).
    exact: bool = False


class FetchConfig(_Strict):
    """http(s) image fetching: a security boundary (see pipeline/images.py)."""

    allow_http: bool = False
    allowed_domains: list[str] = Field(default_factory=list)  # empty = any public host
    # Private / loopback / link-local / metadata ranges are refused unless listed here (tests).
    allowed_private_hosts: list[str] = Field(default_factory=list)
    timeout_s: float = Field(default=10.0, gt=0)
    max_redirects: int = Field(default=3, ge=0)
    retries: int = Field(default=2, ge=0)
    concurrency: int = Field(default=8, ge=1)


class VLLMConfig(_Strict):
    # One LLaVA-NeXT image can take up to 2928 tokens; leave room for text and the answer.
    max_model_len: int = Field(default=4096, ge=256)
    limit_mm_per_prompt: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    mm_processor_cache_gb: float = Field(default=4.0, ge=0)
    max_num_seqs: int = Field(default=256, ge=1)
    load_format: str = "auto"  # "dummy" for benchmarks with random weights
    batches_in_flight: int = Field(default=2, ge=1)


class ObservabilityConfig(_Strict):
    """What a running job or endpoint shows (README, "Observe a job")."""

    # An embedded Ray exports Prometheus metrics at http://127.0.0.1:PORT/metrics; on a cluster
    # (RAY_ADDRESS set) Ray's own export applies and this is ignored.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    progress_interval_s: float = Field(default=30.0, gt=0)


class PlanConfig(_Strict):
    """`llava-ray plan` (README, "Plan a job before running it"): the GPUs its times are for."""

    # Model FLOPs utilisation the times assume: the share of the peak the model's own FLOPs reach
    # (`plan --mfu`). 40% is what a well-batched prefill-heavy vLLM run reaches on one GPU.
    mfu: float = Field(default=0.40, gt=0, le=1)
    # Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets (A10G: the
    # A10's, same GA102 tensor rate; A100 and H100/H200: the SXM parts).
    gpus: dict[str, float] = Field(default_factory=lambda: {"A10G": 125.0, "L4": 121.0, "A100": 312.0, "H100": 989.0, "H200": 989.0})
    seed: int = 0  # the draw of `plan --sample`


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=8, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    served_model_name: str | None = None  # default: model.name
    # transformers: the most requests one generate call takes. No batching delay: a request that
    # finds the model idle starts at once; those arriving meanwhile form the next batch.
    max_batch_size: int = Field(default=8, ge=1)
    num_replicas: int | None = Field(default=None, ge=1)  # fixed count; else autoscaling
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_cpus: float = Field(default=0.5, gt=0)
    max_ongoing_requests: int = Field(default=32, ge=1)
    # Requests waiting for a model replica, at each ingress replica (Serve queues them in the
    # caller's handle); past it a 503 with Retry-After. -1: no bound.
    max_queued_requests: int = Field(default=64, ge=-1)
    # A replica being replaced (redeploy, scale-down, RayService upgrade) gets no new requests and
    # this long to finish the ones it holds: at least the longest generation you serve.
    graceful_shutdown_timeout_s: float = Field(default=60.0, gt=0)
    # How often Serve asks the model replica whether its engine can still serve, and how long
    # it waits for the answer (a check after failures runs one short generation).
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    max_body_bytes: int = Field(default=30 * 1024 * 1024, ge=1)
    # The bearer key clients must send: serve.api_key, else the variable serve.api_key_env names.
    # Neither set (api_key_env: null, or the variable absent) runs without a key, on purpose.
    api_key: str | None = Field(default=None, repr=False)
    api_key_env: str | None = "LLAVA_RAY_API_KEY"

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():  # an empty key must never mean "no authentication"
            raise ValueError("an empty key is not a key; set a real one, or remove serve.api_key to run without one")
        return v

    def admission_bound(self) -> int | None:
        """Chat requests one ingress replica lets in at once (None: no bound): what the model
        replicas hold plus its handle's queue. It refuses more with a 503 before reading them."""
        if self.max_queued_requests < 0:
            return None
        return self.max_ongoing_requests * self.most_model_replicas + self.max_queued_requests

    @property
    def most_model_replicas(self) -> int:
        """The fixed replica count, else autoscaling's maximum."""
        return self.num_replicas or self.autoscaling.max_replicas

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key
        value = os.environ.get(self.api_key_env) if self.api_key_env else None
        if value is not None and not value.strip():
            raise ConfigError("serve.api_key_env", f"${self.api_key_env} is set but empty; set a real key, or unset the variable to run without one")
        return value


# The settings that are secrets: never logged, never written (the manifest redacts them), never
# in a Ray actor's or replica's arguments (Config.without_secrets; ARCHITECTURE.md, "Secrets").
SECRETS: dict[str, set[str]] = {"storage": {"key", "secret"}, "serve": {"api_key"}}


class Config(_Strict):
    """One job or endpoint. `input`/`output` are needed by `run`, not by `serve`."""

    model: ModelConfig
    backend: Literal["transformers", "vllm"] = "transformers"
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    input: InputConfig | None = None
    output: OutputConfig | None = None
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)

    def without_secrets(self) -> "Config":
        """This config with every secret setting unset: what Ray actors and replicas are given."""
        return Config.model_validate(self.model_dump(exclude=SECRETS))

    @property
    def served_name(self) -> str:
        """The model name the endpoint answers to (and reports in responses)."""
        return self.serve.served_model_name or self.model.name

    def context_limit(self, model_context: int) -> int:
        """Tokens a prompt and its answer may take: the model's context, or vllm.max_model_len
        when lower (vLLM refuses longer prompts)."""
        return min(model_context, self.vllm.max_model_len) if self.backend == "vllm" else model_context

    def images_per_row(self, model_max: int) -> int:
        """Images one row may hold: what the checkpoint takes, within limits.max_images_per_row."""
        return min(model_max, self.limits.max_images_per_row)

    def secrets(self) -> dict[str, dict[str, str]]:
        """The secret settings that are set, by section (what `without_secrets` leaves out)."""
        data = self.model_dump(include=SECRETS, exclude_none=True)
        return {section: values for section, values in data.items() if values}

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        """Settings that are valid alone but cannot work together (ConfigError names the key)."""
        if self.backend == "vllm":
            if self.model.quantization.mode != "none":
                raise ConfigError(
                    "model.quantization.mode",
                    "bitsandbytes 4/8-bit runs on backend 'transformers' only; set model.quantization.mode=none "
                    "for vllm (or use a pre-quantized AWQ/GPTQ checkpoint)",
                )
            if self.model.device == "cpu":
                raise ConfigError("model.device", "backend 'vllm' runs on GPU only; set model.device=auto or backend=transformers")
        if self.model.attn_implementation == "flash_attention_2" and self.model.device == "cpu":
            raise ConfigError("model.attn_implementation", "flash_attention_2 needs a GPU; use sdpa on CPU")
        return self


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError("--set", f"{item!r}: expected KEY=VALUE, e.g. generation.max_new_tokens=32")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any] | None) -> dict:
    """Apply dotted overrides (`a.b=c` strings or a {"a.b": value} mapping) to raw config data."""
    items = (
        [(k.split("."), v) for k, v in overrides.items()]
        if isinstance(overrides, dict)
        else [_parse_override(o) for o in overrides or []]
    )
    for path, value in items:
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(path), f"{part!r} is not a section")
        node[path[-1]] = value
    return data


def load_config(source: str | Path | dict, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read YAML (path) or a mapping, apply overrides, validate. Raises ConfigError (one line)."""
    if isinstance(source, dict):
        data = copy.deepcopy(source)  # overrides must not change the caller's mapping
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(str(path), "no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(str(path), f"not valid YAML: {first_line(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(str(path), "the top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        loc, message = describe_validation_error(e)
        raise ConfigError(loc or "<root>", message) from None
