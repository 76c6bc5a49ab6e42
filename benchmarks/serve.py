"""Endpoint latency, throughput and CPU per request: the Serve app against the direct call, in one run.

Both servers load the same checkpoint through the same Preprocessor and HFEngine and answer the
same OpenAI request body, so the ratios measure the serving architecture (proxy, a CPU ingress,
a model replica that batches concurrent requests), not the model code. The direct call is a
stdlib HTTP server in one process that prepares and generates each request as it comes, one at
a time. Both run side by side and the levels alternate between them (direct c=1, Serve c=1,
direct c=4, ...), so that a shared machine's load weighs on both alike:

    python benchmarks/serve.py                           # tiny LLaVA-1.5, concurrency 1 4 16 64
    python benchmarks/serve.py --model /path/to/ckpt --requests 64

Prints one JSON document and writes it to --out (benchmarks/results/serve.json): req/s, p50/p99
latency, errors and CPU milliseconds per request of each process (the direct server; Serve's
proxy, ingress and model replica) per server and concurrency, and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import Config, load_config  # noqa: E402

from report import write_report  # noqa: E402  (benchmarks/report.py, beside this script)

logger = logging.getLogger("benchmarks.serve")
SERVE_CONFIG = ROOT / "configs" / "serve-tiny.yaml"
P50_OVER_DIRECT_AT_1 = 1.25  # Serve's p50 at concurrency 1 over the direct call's: at most
THROUGHPUT_16_OVER_1 = 2.5  # Serve's req/s at concurrency 16 over its own at 1: at least
# The Serve processes a request crosses, by the class name of their Ray actor.
SERVE_ROLES = {"proxy": "ProxyActor", "ingress": "LlavaIngress", "model": "LlavaModel"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bodies(model: str, n: int, max_tokens: int) -> list[dict]:
    """n chat requests over real photos at mixed sizes and four prompts (greedy)."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    sizes = [(512, 512), (300, 451), (400, 600), (427, 640)]
    prompts = ["What is this?", "Describe the picture.", "What color is the sky?", "How many people are there?"]
    uris = []
    for arr, (h, w) in zip(photos, sizes):
        buf = io.BytesIO()
        Image.fromarray(arr).convert("RGB").resize((w, h)).save(buf, "JPEG")
        uris.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return [
        {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": uris[i % 4]}},
                        {"type": "text", "text": prompts[(i // 4) % 4]},
                    ],
                }
            ],
        }
        for i in range(n)
    ]


# -- the baseline: one process, one request at a time --------------------------------------------
def _baseline_main(cfg_data: dict, port: int, ready) -> None:
    """HTTPServer (not Threading): requests are read, preprocessed and generated strictly one by one."""
    from deployments.errors import to_api_error
    from deployments.protocol import (
        ChatCompletion,
        ChatCompletionRequest,
        completion_id,
    )
    from pipeline.checkpoint import Checkpoint
    from pipeline.engines import make_engine
    from pipeline.preprocess import Preprocessor

    cfg = load_config(cfg_data)
    checkpoint = Checkpoint.load(cfg.model)
    preprocessor, engine = Preprocessor(cfg, checkpoint, local_ok=False), make_engine(cfg, checkpoint)
    name = cfg.serve.served_model_name or cfg.model.name

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                req = ChatCompletionRequest.model_validate_json(self.rfile.read(int(self.headers["Content-Length"])))
                sampling = req.to_generation(cfg.generation)
                request_id = completion_id()
                prepared = preprocessor.prepare(req.to_record(request_id), sampling.max_new_tokens)
                [result] = engine.generate([prepared], sampling)
                status, body = 200, ChatCompletion.of(request_id, name, result).model_dump()
            except Exception as e:
                error = to_api_error(e)
                status, body = error.status, error.body()
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    class Server(HTTPServer):
        request_queue_size = 128  # connections wait their turn instead of being refused

    server = Server(("127.0.0.1", port), Handler)
    ready.set()
    server.serve_forever()


# -- load generation -----------------------------------------------------------------------------
async def _load(url: str, bodies: list[dict], concurrency: int) -> dict:
    latencies, errors, tokens = [], 0, []
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(client: httpx.AsyncClient):
        nonlocal errors
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            try:
                r = await client.post(url, json=body)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
                tokens.append(r.json()["usage"]["completion_tokens"])
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    q = np.quantile(latencies, [0.5, 0.99]) if latencies else [float("nan")] * 2
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "errors": errors,
        "seconds": round(wall, 3),
        "req_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(float(q[0]), 3),
        "p99_s": round(float(q[1]), 3),
        "completion_tokens_mean": round(statistics.mean(tokens), 1) if tokens else 0,
    }


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far of each process (its threads included)."""
    return {role: sum(psutil.Process(pid).cpu_times()[:2]) for role, pid in pids.items()}


def measure(url: str, model: str, concurrency: int, n: int, max_tokens: int, pids: dict[str, int]) -> dict:
    """One concurrency level, with the CPU each process spent on it per request."""
    before = cpu_seconds(pids)
    level = asyncio.run(_load(url, request_bodies(model, max(n, 2 * concurrency), max_tokens), concurrency))
    after = cpu_seconds(pids)
    level["cpu_ms_per_request"] = {role: round(1000 * (after[role] - before[role]) / level["requests"], 2) for role in pids}
    return level


@contextmanager
def direct_server(cfg: Config) -> Iterator[tuple[str, dict[str, int]]]:
    """(chat completions URL, {"server": pid}) of the direct call, running in its own process."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_baseline_main, args=(cfg.model_dump(), port, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(300):
            raise RuntimeError("baseline server did not start in 300 s")
        yield f"http://127.0.0.1:{port}/v1/chat/completions", {"server": proc.pid}
    finally:
        proc.terminate()
        proc.join(10)


@contextmanager
def serve_app(cfg: Config) -> Iterator[tuple[str, dict[str, int], str]]:
    """(chat completions URL, process pids, Prometheus URL) of the Serve app on a Ray of its own."""
    import ray
    from ray import serve

    from deployments.app import serve_local

    metrics_port = _free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    try:
        base = serve_local(cfg, blocking=False)
        yield f"{base}/chat/completions", serve_pids(), f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_pids() -> dict[str, int]:
    """The pid of the proxy, the ingress replica and the model replica (one of each here), and
    of this Ray's raylet and GCS, which carry the object transfers and task bookkeeping."""
    import ray
    from ray._private import ray_constants
    from ray._private.state import actors

    alive = [a for a in actors().values() if a["State"] == "ALIVE"]
    pids = {role: next(a["Pid"] for a in alive if a["ActorClassName"].endswith(name)) for role, name in SERVE_ROLES.items()}
    node = ray._private.worker._global_node
    for role, kind in (("raylet", ray_constants.PROCESS_TYPE_RAYLET), ("gcs", ray_constants.PROCESS_TYPE_GCS_SERVER)):
        pids[role] = node.all_processes[kind][0].process.pid
    return pids


def batch_sizes(url: str) -> dict[str, float]:
    """The model replica's llava_ray_batch_size histogram, as Prometheus scrapes it."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(urllib.request.urlopen(url, timeout=10).read().decode()):
        for sample in family.samples:
            if sample.name.startswith("ray_llava_ray_batch_size"):
                key = sample.name.removeprefix("ray_llava_ray_batch_size_") + (f"_le_{sample.labels['le']}" if "le" in sample.labels else "")
                out[key] = out.get(key, 0.0) + sample.value
    out["mean"] = round(out.get("sum", 0.0) / out["count"], 3) if out.get("count") else 0.0
    return out


def targets(baseline: list[dict], served: list[dict], bound: int | None) -> dict:
    by_c = {r["concurrency"]: r for r in served}
    p50 = by_c[1]["p50_s"] / baseline[0]["p50_s"]
    throughput = by_c[16]["req_per_s"] / by_c[1]["req_per_s"]
    errors = sum(r["errors"] for r in served if bound is None or r["concurrency"] <= bound)
    return {
        "p50_at_1_over_direct": {"value": round(p50, 2), "target": f"<= {P50_OVER_DIRECT_AT_1}", "met": p50 <= P50_OVER_DIRECT_AT_1},
        "req_per_s_at_16_over_1": {"value": round(throughput, 2), "target": f">= {THROUGHPUT_16_OVER_1}",
                                   "met": throughput >= THROUGHPUT_16_OVER_1},
        "errors_up_to_queue_bound": {"value": errors, "target": f"0 (bound {bound})", "met": errors == 0},
    }


def markdown(r: dict) -> str:
    """The tables for benchmarks/README.md."""
    roles = ["server", *SERVE_ROLES, "raylet", "gcs"]
    rows = [f"| {name} | {x['concurrency']} | {x['req_per_s']} | {x['p50_s']:.3f} | {x['p99_s']:.3f} | {x['errors']} | "
            + " | ".join(str(x["cpu_ms_per_request"].get(role, "")) for role in roles) + " |"
            for name, key in (("direct", "baseline"), ("Serve", "serve")) for x in r[key]]
    return "\n".join([
        f"{r['model']}, max_tokens {r['max_tokens']}, {r['cpus']} CPUs, serve {r['serve_config']}; "
        f"1-minute load average {r['load_average_1m']['start']} -> {r['load_average_1m']['end']}.",
        "",
        "| server | concurrency | req/s | p50 s | p99 s | errors | CPU ms/request: direct server | proxy | ingress | model | raylet | gcs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "| target | value | met |",
        "|---|---|---|",
        *(f"| {name}: {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for name, t in r["targets"].items()),
    ])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(SERVE_CONFIG))
    p.add_argument("--model", default=None, help="override model.name (default: the config's, tiny-llava)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="must include 1 and 16 (the targets)")
    p.add_argument("--requests", type=int, default=96, help="requests per level (at least 2x the concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, for both servers")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise

    overrides = [f"serve.port={_free_port()}", "serve.api_key_env=null", f"generation.max_new_tokens={args.max_tokens}"]
    if args.model:
        overrides.append(f"model.name={args.model}")
    cfg = load_config(args.config, overrides=overrides + args.set)
    model = cfg.serve.served_model_name or cfg.model.name
    load_start = round(os.getloadavg()[0], 2)
    baseline, served = [], []
    logger.info("serve: %s", cfg.serve.model_dump(exclude={"api_key"}))
    with direct_server(cfg) as (direct_url, direct_pids), serve_app(cfg) as (serve_url, pids, metrics_url):
        for url in (direct_url, serve_url):  # warm-up: loads, JIT, caches
            asyncio.run(_load(url, request_bodies(model, 4, args.max_tokens), 2))
        for c in args.concurrency:  # interleaved, so that a shared machine's load weighs on both alike
            logger.info("concurrency %d", c)
            baseline.append(measure(direct_url, model, c, args.requests, args.max_tokens, direct_pids))
            served.append(measure(serve_url, model, c, args.requests, args.max_tokens, pids))
        time.sleep(3)  # two metrics export periods
        batches = batch_sizes(metrics_url)
    report = {
        "benchmark": "serve",
        "model": cfg.model.name,
        "backend": cfg.backend,
        "max_tokens": args.max_tokens,
        "cpus": os.cpu_count(),
        "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "overrides": args.set,
        "model_config": {"torch_threads": cfg.model.torch_threads, "model_cpus": cfg.resources.model_cpus},
        "serve_config": {k: getattr(cfg.serve, k) for k in ("num_replicas", "max_batch_size", "max_ongoing_requests", "max_queued_requests")},
        "baseline": baseline,
        "serve": served,
        "serve_batch_sizes": batches,
        "targets": targets(baseline, served, cfg.serve.admission_bound()),
    }
    return write_report(report, args.out, markdown)


if __name__ == "__main__":
    main()
