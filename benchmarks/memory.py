"""Peak memory of the model engine by precision (issue 7), each in a fresh process.

A 'tiny-but-wider' LLaVA-1.5 (Llama text model 8 layers x 1024, small vision tower, as in real
LLaVA where the language model dominates; weights stored in bfloat16 like the real checkpoints)
is loaded with the transformers engine at float32, bfloat16, 8-bit and 4-bit and generates once.
Per precision, as growth over the process after imports (bitsandbytes imported in every mode):
the kernel's peak RSS (VmHWM, reset after the imports), anonymous memory after generating, and
transformers' own memory footprint.

    python benchmarks/memory.py [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "float32": {"model.dtype": "float32"},
    "bfloat16": {"model.dtype": "bfloat16"},
    "8bit": {"model.dtype": "bfloat16", "model.quantization.mode": "8bit"},
    "4bit": {"model.dtype": "bfloat16", "model.quantization.mode": "4bit"},
}

_CHILD = r"""
import json, sys
import numpy as np
import torch, transformers, bitsandbytes
from pipeline.checkpoint import Checkpoint
from pipeline.config import load_config
from pipeline.engines.hf import HFEngine
from pipeline.records import PreparedRequest

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

# Peak RSS as the kernel counts it: writing 5 to clear_refs resets VmHWM to the current RSS, so
# the figure below is the peak growth over the process after its imports, with no sampling.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base_anon, base_hwm = status("RssAnon"), status("VmHWM")
cfg = load_config({"model": {"name": sys.argv[1]}, "generation": {"max_new_tokens": 8}}, json.loads(sys.argv[2]))
engine = HFEngine(cfg, Checkpoint.load(cfg.model))
ids = np.array([1] + [engine.model.config.image_token_index] * 576 + [5, 6, 7], np.int32)
request = PreparedRequest(id=0, prompt="", input_ids=ids, image_tokens=576,
                          tiles=np.full((1, 3, 336, 336), 128, np.uint8), tiles_per_image=[1], image_sizes=[(336, 336)])
result = engine.generate([request], cfg.generation)[0]
import gc; gc.collect()
assert result.error is None, result.error
lm_linear = {type(m).__name__ for n, m in engine.model.named_modules() if "language_model" in n and isinstance(m, torch.nn.Linear)}
print(json.dumps({"anon_after_bytes": status("RssAnon") - base_anon, "hwm_bytes": status("VmHWM") - base_hwm,
                  "footprint_bytes": engine.model.get_memory_footprint(),
                  "backend": engine.backend, "language_model_linear": sorted(lm_linear)}))
"""


def build_wide_checkpoint(out_dir: str | Path) -> Path:
    from pipeline.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(out_dir, "llava", text_hidden=1024, vision_hidden=64, layers=8, save_dtype="bfloat16")


def measure(checkpoint: str | Path, overrides: dict) -> dict:
    """Load + one generate in a fresh interpreter; returns its memory growth figures."""
    # A fixed mmap threshold: glibc otherwise raises it after large frees and keeps freed
    # memory resident, so the same run measured anywhere from 206 to 409 MiB.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(checkpoint), json.dumps(overrides)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1], env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_wide_checkpoint(Path(tmp) / "wide")
        results = {mode: measure(ckpt, overrides) for mode, overrides in MODES.items()}
    base = results["float32"]["hwm_bytes"]
    for r in results.values():
        r["hwm_ratio_vs_float32"] = round(r["hwm_bytes"] / base, 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    print("| precision | footprint MiB | anon after generate MiB | peak RSS growth (VmHWM) MiB (ratio) | backend |")
    print("| --- | ---: | ---: | ---: | --- |")
    for mode, r in results.items():
        print(f"| {mode} | {mib(r['footprint_bytes'])} | {mib(r['anon_after_bytes'])} | {mib(r['hwm_bytes'])} "
              f"({r['hwm_ratio_vs_float32']}) | {r['backend']} |")


if __name__ == "__main__":
    main()
