"""The project's Prometheus metrics, on Ray's own machinery (`ray.util.metrics`).

Ray's metrics agent exports them (with its `ray_` prefix) wherever Ray runs: on a cluster it is
Ray's export that Prometheus scrapes; on an embedded Ray, `observability.metrics_port` picks the
port. Every name lives here, so the dashboard's test can check that each query names a metric
the code exports. Objects are made lazily, in the process that records (an actor, a replica,
the driver), since `ray.util.metrics` needs a connected Ray worker.
"""

from __future__ import annotations

from functools import cache

# The job. Row, token and failure counts are recorded by the driver from the committed output
# (pipeline/progress.py), so they equal the output exactly; images and stage latency by the actors.
ROWS = "llava_ray_rows_total"  # tags: status (ok | error), kind (an error kind, or none)
IMAGES = "llava_ray_images_total"
PROMPT_TOKENS = "llava_ray_prompt_tokens_total"
IMAGE_TOKENS = "llava_ray_image_tokens_total"
GENERATED_TOKENS = "llava_ray_generated_tokens_total"
STAGE_SECONDS = "llava_ray_stage_seconds"  # tag: stage (preprocess | generate); one sample per batch

# The endpoint.
REQUESTS = "llava_ray_requests_total"  # tags: status (HTTP code), stream (true | false)
TIME_TO_FIRST_TOKEN = "llava_ray_time_to_first_token_seconds"
TIME_PER_OUTPUT_TOKEN = "llava_ray_time_per_output_token_seconds"
REQUEST_SECONDS = "llava_ray_request_seconds"
BATCH_SIZE = "llava_ray_batch_size"
STREAMS_ABORTED = "llava_ray_streams_aborted_total"  # streams the client left before their end

COUNTERS = (ROWS, IMAGES, PROMPT_TOKENS, IMAGE_TOKENS, GENERATED_TOKENS, REQUESTS, STREAMS_ABORTED)
HISTOGRAMS = (STAGE_SECONDS, TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN, REQUEST_SECONDS, BATCH_SIZE)

_TAGS = {ROWS: ("status", "kind"), STAGE_SECONDS: ("stage",), REQUESTS: ("status", "stream")}
_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
_BOUNDARIES = {
    STAGE_SECONDS: _SECONDS,
    TIME_TO_FIRST_TOKEN: _SECONDS,
    TIME_PER_OUTPUT_TOKEN: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
    REQUEST_SECONDS: _SECONDS,
    # One bucket per size up to 16: batch sizes are read exactly from the buckets (Ray's
    # exported _sum of a histogram is an estimate from its buckets, not the sum).
    BATCH_SIZE: [*range(1, 17), 32, 64, 128, 256],
}
_DESCRIPTIONS = {
    ROWS: "Output rows by status and error kind",
    IMAGES: "Images prepared for the model",
    PROMPT_TOKENS: "Prompt tokens of the output rows (images included)",
    IMAGE_TOKENS: "Image tokens of the output rows",
    GENERATED_TOKENS: "Tokens generated for the output rows",
    STAGE_SECONDS: "Seconds per batch in a stage",
    REQUESTS: "Endpoint requests by HTTP status and streaming",
    TIME_TO_FIRST_TOKEN: "Seconds from a streaming request's arrival to its first text",
    TIME_PER_OUTPUT_TOKEN: "Seconds per generated token after the first, streaming requests",
    REQUEST_SECONDS: "Seconds from a request's arrival to its last byte",
    BATCH_SIZE: "Requests per model batch (transformers backend)",
    STREAMS_ABORTED: "Streams whose generation was stopped because the client went away",
}


@cache
def metric(name: str):
    """The process's one Counter or Histogram of that name."""
    from ray.util.metrics import Counter, Histogram

    tags = _TAGS.get(name, ())
    if name in COUNTERS:
        return Counter(name, description=_DESCRIPTIONS[name], tag_keys=tags)
    return Histogram(name, description=_DESCRIPTIONS[name], boundaries=_BOUNDARIES[name], tag_keys=tags)


def exported(name: str) -> str:
    """The name Prometheus sees: Ray's exporter prefixes `ray_`."""
    return f"ray_{name}"
