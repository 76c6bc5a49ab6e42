"""Ray Serve wiring, and the only module that calls `serve.deployment` / `.bind`.

    serve run deployments.app:build_app config=configs/serve-tiny.yaml
    # RayService: import_path deployments.app:build_app, args {config: ..., set: {...}}
    llava-ray serve configs/serve-tiny.yaml      # -> serve_local

Two deployments: `LlavaIngress` (CPU, FastAPI, Preprocessor) in front of `LlavaModel` (the
Engine, on a GPU when configured). Replica counts, queue limits and resources come from the
config's `serve` and `resources` sections.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any, Callable

from ray import serve
from ray.serve import Application

from pipeline.checks import check_environment
from pipeline.cluster import init_ray
from pipeline.config import Config, ServeConfig, load_config

from .model import LlavaModelServer
from .serving import LlavaIngressServer, api, key_digest

logger = logging.getLogger(__name__)

APP_NAME = "llava"

LlavaModel = serve.deployment(name="LlavaModel")(LlavaModelServer)
LlavaIngress = serve.deployment(name="LlavaIngress")(serve.ingress(api)(LlavaIngressServer))


def ingress_max_ongoing(s: ServeConfig) -> int:
    """The ingress refuses chat requests past `admission_bound` itself (our JSON 503), so Serve
    lets twice that in: /health and /v1/models still pass, and nothing waits in the proxy's
    queue for a timeout."""
    bound = s.admission_bound()
    if bound is None:  # no queue bound: as many as the model replicas can hold and queue as much again
        bound = 2 * s.max_ongoing_requests * s.most_model_replicas
    return 2 * bound


def model_max_queued(s: ServeConfig) -> int:
    """The model handle's queue bound, a safety net behind the ingress's: Serve counts a request
    as queued until a replica takes it, so under a burst its check refuses requests a replica
    was about to take; with the ingress's bound as its own it never fires before ours."""
    bound = s.admission_bound()
    return -1 if bound is None else bound


def lifecycle_options(s: ServeConfig) -> dict[str, Any]:
    """How long a replica being replaced may finish what it holds (both deployments)."""
    return {"graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s}


def model_options(cfg: Config) -> dict[str, Any]:
    s = cfg.serve
    options: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": model_max_queued(s),
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        "ray_actor_options": {"num_cpus": cfg.resources.model_cpus, "num_gpus": cfg.resources.num_gpus_per_actor},
        **lifecycle_options(s),
    }
    if s.num_replicas is not None:
        options["num_replicas"] = s.num_replicas
    else:
        options["autoscaling_config"] = s.autoscaling.model_dump()
    return options


# A prepared request (a 336x336 tile alone is 338 KB of uint8) crosses to the model replica inside
# the call rather than through the object store, which Ray uses for arguments over 100 KB: one
# copy instead of a put, a fetch and their bookkeeping in the raylet (measured: the raylet's CPU
# per request 4.1 -> 0.9 ms). The caller's setting decides, so only the ingress gets it.
INGRESS_ENV = {"RAY_max_direct_call_object_size": str(8 * 1024 * 1024)}


def ingress_options(cfg: Config) -> dict[str, Any]:
    return {
        "num_replicas": cfg.serve.ingress_replicas,
        "max_ongoing_requests": ingress_max_ongoing(cfg.serve),
        "ray_actor_options": {"num_cpus": cfg.serve.ingress_cpus, "runtime_env": {"env_vars": INGRESS_ENV}},
        **lifecycle_options(cfg.serve),
    }


def build(cfg: Config) -> Application:
    check_environment(cfg)
    key = cfg.serve.resolved_api_key()  # an empty key variable fails here, in one line, not in a replica
    # Replicas get the config without its secrets, and the ingress the key's digest, never the
    # key: Ray shows actor arguments in its dashboard and task specs.
    public = cfg.without_secrets()
    model = LlavaModel.options(**model_options(cfg)).bind(public)
    return LlavaIngress.options(**ingress_options(cfg)).bind(public, model, key_digest(key))


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder. args: {"config": "<YAML path>", "set": {"dotted.key": value}}
    ("set" optional; a list of "key=value" strings works too)."""
    if "config" not in args:
        raise ValueError("build_app: pass the config path, e.g. `serve run deployments.app:build_app config=configs/serve-tiny.yaml`")
    return build(load_config(args["config"], overrides=args.get("set")))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def serve_local(cfg: Config, *, blocking: bool = True, on_ready: Callable[[str], None] | None = None) -> str:
    """Run the app on this machine's Ray (started here if none is running) at serve.host:port.

    Calls `on_ready(url)` once the app answers, with url = http://host:port/v1; then, when
    `blocking`, serves until Ctrl-C and shuts Serve (and a Ray it started) down. Returns the url.
    """
    import ray

    app = build(cfg)  # every check before Ray starts
    started_ray = init_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    logger.info("serving %s at %s", cfg.served_name, url)
    if on_ready is not None:
        on_ready(url)
    if blocking:
        # Ctrl-C and SIGTERM (a pod's stop) both drain and exit. Installed here, not left to
        # Python's default: a process started in the background by a shell inherits SIGINT
        # ignored, and then Python installs no handler at all.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            logger.info("stopping")
        finally:
            serve.shutdown()
            if started_ray:
                ray.shutdown()
    return url
