"""Where the offline job's start-up goes (issue 23), each piece in a fresh process, on N rows
(default 256) of `offline.py`'s input and settings (tiny LLaVA-1.5, 64 new tokens):

  preflight  `job.preflight`: the checks, the checkpoint opened on the driver, the input inspected
  imports    what an actor process imports before its constructor (the stages; torch and
             transformers in the model actor's)
  cpu actor  Checkpoint.load without torch + the Preprocessor, after those imports (its constructor)
  model      Checkpoint.load without scipy + the engine's model load, after those imports (the model
             actor's), and its whole process's CPU seconds; beside it the same with scipy kept (as
             before model processes left it out, and as a script pays): the median of 3 interleaved
  job        run_job once Ray and its worker pool are up (as offline.py times it); each committed
             output file's mtime gives the first and the last block's commit; Ray's timeline
             (`ray.timeline()`) when the file listing, the first read, each actor's constructor and
             each stage's first batch ran
Steady state: the rows after the first block over the time from the first commit to the last.
Start-up: the job's wall minus N / steady rate. (a)/(b) at N is offline.py's; this splits its gap.
CPU: every 0.1 s the job's driver reads the machine's busy time (/proc/stat) and the model actor's
CPU seconds (psutil): the cores in use before the model actor is ready and after, and the share of
a core the model actor got from its process's start to the end of its constructor.

    python benchmarks/startup.py [--rows 256] [--out benchmarks/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_ROUNDS = 3  # the model piece, with scipy left out and kept: the median of each
sys.path.insert(0, str(ROOT / "benchmarks"))

_PIECE = r"""
import json, resource, sys, time
from pipeline.checkpoint import SCIPY, TORCH, Checkpoint, leave_out
from pipeline.config import Config
piece, cfg = sys.argv[1], Config.model_validate_json(sys.argv[2])
if piece == "model":  # as the model actor does before transformers is imported (engines.model_checkpoint)
    leave_out(cfg.model, SCIPY)
t0 = time.perf_counter()
if piece == "cpu":  # the CPU actor imports the stages; its constructor loads transformers without torch
    import pipeline.stages  # noqa: F401
else:
    import torch, transformers, pipeline.stages  # noqa: F401
imports = time.perf_counter() - t0
t0 = time.perf_counter()
if piece == "cpu":
    from pipeline.preprocess import Preprocessor
    Preprocessor(cfg, Checkpoint.load(cfg.model, unused=TORCH))
else:  # scipy already left out for "model"; kept for "model_with_scipy" (before that change; a script's)
    from pipeline.engines import make_engine
    make_engine(cfg, Checkpoint.load(cfg.model))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"imports_s": imports, "load_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "scipy": sys.modules.get("scipy") is not None}))
"""

_JOB = r"""
import json, os, sys, time
SPANS = {"list_files": "task::ListFiles", "first_read": "task::ReadFiles", "cpu_actor_constructor": "PreprocessStage)).__init__",
         "model_actor_constructor": "GenerateStage)).__init__", "first_prepare": "PreprocessStage)).submit",
         "first_generate": "GenerateStage)).submit", "first_write": "task::Write"}
import threading
import psutil
import ray
from report import cpu_jiffies
from ray.data import DataContext
from pipeline.checkpoint import TORCH, leave_out
from pipeline.cluster import local_cpus
from pipeline.config import Config
from pipeline.job import preflight, run_job
cfg = Config.model_validate_json(sys.argv[1])
leave_out(cfg.model, TORCH)  # as `llava-ray run`'s process does (pipeline.cli._config)
cpus = local_cpus(cfg)
ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
ray.get([ray.remote(lambda: None).remote() for _ in range(cpus)])
DataContext.get_current().enable_progress_bars = False
t0 = time.perf_counter()
preflight(cfg)
pre = time.perf_counter() - t0

samples, done = [], threading.Event()  # (s from run_job's start, busy jiffies, all jiffies, model actor CPU-s)
found = {}  # model_created: when the model actor's process started, s from run_job's start
def titled(p, part):
    try:
        return part in (p.cmdline() or [""])[0]
    except psutil.Error:  # it exited while being looked at
        return False

def sample():
    model = None
    while not done.wait(0.1):
        if model is None:
            model = next((p for p in psutil.Process().children(recursive=True) if titled(p, "GenerateStage")), None)
        try:
            cpu = sum(model.cpu_times()[:2]) if model else None
        except psutil.Error:
            cpu = None
        samples.append((time.time() - start_wall, *cpu_jiffies(), cpu))
        if model is not None and "model_created" not in found:
            found["model_created"] = model.create_time() - start_wall

start_wall, t0 = time.time(), time.perf_counter()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
summary = run_job(cfg)
seconds = time.perf_counter() - t0
done.set()
sampler.join()
out = cfg.output.path
commits = sorted(os.path.getmtime(os.path.join(out, f)) - start_wall for f in os.listdir(out) if f.endswith(".parquet"))
# Ray's own timeline: when each piece ran, from run_job's start (first span of each kind).
spans = {}
for e in sorted((e for e in ray.timeline() if e.get("ph") == "X"), key=lambda e: e["ts"]):
    kind = next((k for k, part in SPANS.items() if part in e.get("cat", "")), None)
    if kind and kind not in spans:
        spans[kind] = [round(e["ts"] / 1e6 - start_wall, 2), round((e["ts"] + e["dur"]) / 1e6 - start_wall, 2)]
ready = spans["model_actor_constructor"][1]
def cores(t_from, t_to):  # the machine's cores in use, on average, between two times
    inside = [x for x in samples if t_from <= x[0] <= t_to]
    return round((inside[-1][1] - inside[0][1]) / (inside[-1][2] - inside[0][2]) * os.cpu_count(), 2)
model_cpu = next(x[3] for x in samples if x[0] >= ready and x[3] is not None)
cpu = {"cores_busy_before_model_ready": cores(0, ready), "cores_busy_after_model_ready": cores(ready, seconds),
       "model_actor_process_start_s": round(found["model_created"], 2), "model_actor_cpu_s_when_ready": round(model_cpu, 2),
       "model_actor_share_of_a_core_until_ready": round(model_cpu / (ready - found["model_created"]), 2)}
print(json.dumps({"preflight_s": pre, "seconds": seconds, "rows": summary.rows_processed, "commits": commits,
                  "rows_per_block": cfg.resources.rows_per_block, "spans": spans, "cpu": cpu}))
"""


def child(code: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]),
                              "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    if res.returncode:
        sys.exit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    import offline

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        from pipeline.tiny import build_tiny_checkpoint

        work = Path(tmp)
        llava = build_tiny_checkpoint(work / "tiny-llava", "llava")
        data = offline.write_input(work / "in", 1, args.rows, offline.encoded_images())
        cfg = offline.job_config(llava, data, work / "out", offline.NEW_TOKENS)
        load = os.getloadavg()[0]
        cpu = child(_PIECE, "cpu", cfg.model_dump_json())
        models = {"model": [], "model_with_scipy": []}
        for _ in range(MODEL_ROUNDS):  # interleaved: the host's speed moves between runs
            for piece, runs in models.items():
                runs.append(child(_PIECE, piece, cfg.model_dump_json()))
        assert not any(r["scipy"] for r in models["model"]) and all(r["scipy"] for r in models["model_with_scipy"])
        model = {k: statistics.median(r[k] for r in models["model"]) for k in ("imports_s", "load_s", "cpu_s")}
        with_scipy = {k: statistics.median(r[k] for r in models["model_with_scipy"]) for k in ("load_s", "cpu_s")}
        job = child(_JOB, cfg.model_dump_json())
    first, last = job["commits"][0], job["commits"][-1]
    block = job["rows_per_block"]
    steady = (job["rows"] - block) / (last - first) if last > first else float("nan")
    startup = job["seconds"] - job["rows"] / steady
    report = {
        "benchmark": "startup", "rows": job["rows"], "load_1m": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)},
        "preflight_s": round(job["preflight_s"], 2),
        "cpu_actor_imports_s": round(cpu["imports_s"], 2), "cpu_actor_load_s": round(cpu["load_s"], 2),
        "model_actor_imports_s": round(model["imports_s"], 2), "model_load_s": round(model["load_s"], 2),
        "model_actor_cpu_s": round(model["cpu_s"], 2),
        "model_load_with_scipy_s": round(with_scipy["load_s"], 2), "model_actor_cpu_with_scipy_s": round(with_scipy["cpu_s"], 2),
        "job_s": round(job["seconds"], 2), "first_commit_s": round(first, 2), "last_commit_s": round(last, 2),
        "steady_rows_per_s": round(steady, 3), "startup_s": round(startup, 2),
        "spans_from_run_job_start": job["spans"],
        "cpu": job["cpu"],
        "job_rate_over_steady": round(job["rows"] / job["seconds"] / steady, 3),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for k, v in report.items():
        print(f"{k:24} {v}")


if __name__ == "__main__":
    main()
