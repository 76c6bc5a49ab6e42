"""The input's id check at scale (issue 23): on the driver vs on the cluster vs trusted.

N string ids (default 10M, `row-000000000` ...) in 10 Parquet files, one repeat. Each way runs in
a fresh process: (a) `inspect_input` with the ids on the driver (the default up to
`input.driver_id_check_max_rows`), (b) the same input over that bound: `inspect_input` then
`check_ids_on_cluster` (a Ray Data hash aggregation; Ray's start is timed apart), (c)
`input.duplicate_ids: trust` (the row count from the Parquet footers only). Reported: seconds of
the check and the driver process's peak RSS (VmHWM) and its growth over the process after imports.

The resume reconcile at the same scale: an output of N ids in blocks of 10,000 rows as Ray Data
writes them (a data file and its checkpoint file per block), one block's checkpoint deleted.
(d) every output and checkpoint id read on the driver, as the reconcile did before it went
block by block; (e) `resume.reconcile` with the default bound (one block's ids at a time on the
driver, the repeat count on the cluster). (b) and (e) run again with Ray Data's own partition
count for the aggregation (`*_200_partitions`: 200 whatever the size) against ours (one per
`readers.IDS_PER_PARTITION` ids).

    python benchmarks/ids.py [--rows 10000000] [--out benchmarks/results/ids.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Both children: the driver's peak RSS (VmHWM) and, for the cluster ways, a local Ray timed apart.
_PRELUDE = r"""
import json, sys, time
import pyarrow as pa
import ray, ray.data
from pipeline.config import load_config

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def start_ray():
    t = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - t

way = sys.argv[1]
if way.endswith("_200_partitions"):  # Ray Data's default count: one id per partition, capped at its 200
    import pipeline.readers
    pipeline.readers.IDS_PER_PARTITION = 1
    way = way.removesuffix("_200_partitions")
base = hwm()
"""

_CHILD = _PRELUDE + r"""
from pipeline.inputs import check_ids_on_cluster, inspect_input
from pipeline.readers import open_input

data = sys.argv[2]
extra = {"driver": {"driver_id_check_max_rows": 10**12}, "cluster": {"driver_id_check_max_rows": 0},
         "trust": {"duplicate_ids": "trust"}}[way]
cfg = load_config({"model": {"name": "unused"}, "input": {"path": data, "duplicate_ids": "keep_first", **extra},
                   "output": {"path": data + "-out"}})
ray_s = start_ray() if way == "cluster" else 0.0
t = time.perf_counter()
plan = check_ids_on_cluster(cfg, inspect_input(cfg, open_input(cfg)))
seconds = time.perf_counter() - t
print(json.dumps({"way": sys.argv[1], "seconds": round(seconds, 2), "ray_start_s": round(ray_s, 2), "rows": plan.rows,
                  "dropped": plan.dropped_duplicates, "peak_rss_mib": round(hwm(), 1),
                  "growth_mib": round(hwm() - base, 1)}))
"""


_RECONCILE = _PRELUDE + r"""
from pipeline.readers import output_repeats
from pipeline.resume import checkpoint_path, reconcile
from pipeline.storage import output_rows

out = sys.argv[2]
cfg = load_config({"model": {"name": "unused"}, "input": {"path": out + "-in"}, "output": {"path": out}})
ray_s = start_ray() if way == "reconcile" else 0.0
t = time.perf_counter()
if way == "all_ids":
    ids = output_rows(out, cfg.storage, ["id"]).column(0)
    listed = output_rows(checkpoint_path(cfg), cfg.storage, ["id"]).column(0)
    rows, note = len(ids), pa.compute.count_distinct(ids).as_py() - len(listed)
else:
    note = reconcile(cfg, pa.string(), lambda files, rows: output_repeats(cfg, files, pa.string(), rows)).note
    rows = None
seconds = time.perf_counter() - t
print(json.dumps({"way": sys.argv[1], "seconds": round(seconds, 2), "ray_start_s": round(ray_s, 2), "rows": rows,
                  "note": note, "peak_rss_mib": round(hwm(), 1), "growth_mib": round(hwm() - base, 1)}))
"""


def write_output(folder: Path, rows: int, block: int = 10_000) -> Path:
    """An output as Ray Data writes it: `<base>-0.parquet` per block and its checkpoint
    `<base>.parquet` beside the output; the first block's checkpoint missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, ckpt = folder / "out", folder / "out.checkpoint"
    out.mkdir()
    ckpt.mkdir()
    for k, start in enumerate(range(0, rows, block)):
        ids = pa.array([f"row-{i:09d}" for i in range(start, min(rows, start + block))])
        base = f"write_{k:06d}"
        pq.write_table(pa.table({"id": ids, "text": pa.nulls(len(ids), pa.string())}), out / f"{base}-0.parquet")
        if k:
            pq.write_table(pa.table({"id": ids}), ckpt / f"{base}.parquet")
    return out


def write_ids(folder: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = 10
    for k in range(parts):
        start, stop = k * rows // parts, (k + 1) * rows // parts
        ids = [f"row-{i:09d}" for i in range(start, stop)]
        if k == parts - 1:
            ids[-1] = "row-000000000"  # one repeat, so (a) and (b) find something to report
        pq.write_table(pa.table({"id": ids, "image_path": pa.nulls(len(ids), pa.string())}), folder / f"part-{k}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--out", default="benchmarks/results/ids.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ids"
        data.mkdir()
        write_ids(data, args.rows)
        results = []
        for way in ("driver", "cluster", "cluster_200_partitions", "trust"):
            res = subprocess.run([sys.executable, "-c", _CHILD, way, str(data)], capture_output=True, text=True,
                                 env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
            if res.returncode:
                sys.exit(res.stderr[-3000:])
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        output = write_output(Path(tmp), args.rows)
        for way in ("all_ids", "reconcile", "reconcile_200_partitions"):
            res = subprocess.run([sys.executable, "-c", _RECONCILE, way, str(output)], capture_output=True, text=True,
                                 env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
            if res.returncode:
                sys.exit(res.stderr[-3000:])
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    out = {"rows": args.rows, "load_1m": os.getloadavg()[0], "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{args.rows:,} ids, 1 repeated; load {out['load_1m']:.2f}")
    print("| way | check s | Ray start s | driver peak RSS MiB | growth over imports MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['way']} | {r['seconds']} | {r['ray_start_s']} | {r['peak_rss_mib']} | {r['growth_mib']} |")


if __name__ == "__main__":
    main()
