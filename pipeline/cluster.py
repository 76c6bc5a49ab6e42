"""Start or join Ray for the job and the endpoint, the same way for both.

With RAY_ADDRESS set (a RayJob's driver, a RayService) Ray attaches to that cluster. Without it
we start a Ray of our own on this machine, even when another `ray start` runs here: a bare
`ray.init()` would find that one's address file and attach to a stranger's cluster (or refuse
our CPU count).
"""

from __future__ import annotations

import math
import os

from .config import Config


def local_cpus(cfg: Config) -> int:
    """Logical CPUs for an embedded Ray: the two actor pools, Ray Data's checkpoint-filter actor
    on a resumed run (1 CPU, not configurable), and one CPU for read/write tasks -- on a 2-core
    machine the machine's count alone leaves a resumed job with no CPU for reads and it hangs."""
    r = cfg.resources
    need = r.preprocess_actors * r.preprocess_cpus + r.model_actors * r.model_cpus + 2
    return max(os.cpu_count() or 1, math.ceil(need))


# With observability.metrics_port, Ray's agent exports every second (instead of every 10 s), so a
# scrape of a short job sees its counts; the job lingers two periods at the end for the last one.
METRICS_REPORT_S = 1.0


def init_ray(cfg: Config) -> bool:
    """Make sure Ray is up; True when this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)  # a cluster's own metrics export applies
        return True
    metrics = {}
    if cfg.observability.metrics_port:
        metrics = {"_metrics_export_port": cfg.observability.metrics_port,
                   "_system_config": {"metrics_report_interval_ms": int(METRICS_REPORT_S * 1000)}}
    ray.init(address="local", num_cpus=local_cpus(cfg), configure_logging=False, **metrics)
    return True
