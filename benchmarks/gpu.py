"""GPU benchmark: our offline job on vLLM against bare vLLM, ray.data.llm and the HF model-card loop.

    python3 benchmarks/gpu.py run --model llava-1.5-7b --systems a,b --out $OUT/gpu-llava-1.5-7b-ab.json
    python3 benchmarks/gpu.py run --model llava-1.5-7b --systems c,d --out $OUT/gpu-llava-1.5-7b-cd.json
    python3 benchmarks/gpu.py report gpu-*.json --json gpu.json    # merge, ratios, MFU, markdown (no GPU)

Systems, all on the same rows (real photos from scikit-image at camera sizes, every image
unique so prefix and processor caches cannot short-cut), 64 output tokens forced:
  a  our job: pipeline.job.build_dataset (CPU actors -> async vLLM model actor) -> Parquet
  b  bare `vllm.LLM.generate` on the same prompts and decoded images, one call, one process
  c  Ray's `ray.data.llm` vLLM processor (images as data URIs through its multimodal stage)
  d  the HF model-card loop: processor + `generate`, one row at a time (fewer rows)
Full-size architectures with random weights: vLLM loads `load_format="dummy"`, transformers
builds the model from the same hand-written config (CLIP ViT-L/14-336 + Llama-2-7B or
Mistral-7B). Each system runs in its own process, so GPU memory and Ray start clean.

Rates: (a) and (c) over their engine operator's busy window (Ray Data's first task start to
last task end: the engine's load is excluded, every bubble of the pipeline is included);
(b) over the `generate` call; (d) over the loop after one warm-up row. End-to-end wall times
(engine start included) are reported too.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import PlanConfig  # noqa: E402
from pipeline.families import family_spec  # noqa: E402
from pipeline.layouts import CLIP_336, NEXT_PINPOINTS, layout  # noqa: E402

logger = logging.getLogger("bench")

NEW_TOKENS = 64
VOCAB = 32064  # llava-hf's vocabularies: 32000 text tokens + <image> + <pad>, padded to 64
# The two layouts benchmarked, at full size (pipeline/layouts.py: the real configs).
ARCHS = {name: layout(name) for name in ("llava-1.5-7b", "llava-v1.6-mistral-7b")}
VISION = CLIP_336
# The same engine settings for a, b and c.
ENGINE = dict(max_model_len=4096, gpu_memory_utilization=0.9, max_num_seqs=256, enable_prefix_caching=True,
              mm_processor_cache_gb=4.0, enforce_eager=False, load_format="dummy")
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
          "motorcycle_left", "motorcycle_right"]
SIZES = [(640, 480), (1024, 768), (1280, 960), (2000, 1500), (768, 1024), (1500, 2000), (1920, 1080), (900, 300),
         (300, 900), (800, 800)]  # (width, height)
PROMPTS = ["Describe this image in one sentence.", "What is shown in this picture?", "List the objects you can see.",
           "What colours dominate this image?", "Is there a person in this image? Explain."]
PEAK_BF16 = {gpu: tflops * 1e12 for gpu, tflops in PlanConfig().gpus.items()}  # dense bf16 FLOP/s (`plan.gpus`)


# -- the model directory: config, tokenizer and processor of the real architecture, no weights --
def build_model_dir(name: str, out: Path) -> Path:
    import transformers as tf

    from pipeline.tiny import llava_config, llava_processor, train_tokenizer

    if (out / "config.json").is_file():
        return out
    spec = ARCHS[name]
    tokenizer = train_tokenizer(512, spec)
    # Random weights can emit any id: every id of the model's vocabulary must decode.
    tokenizer.add_tokens([f"<|w{i}|>" for i in range(VOCAB - len(tokenizer))])
    assert len(tokenizer) == VOCAB
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_config = dict(spec.text, vocab_size=VOCAB, tie_word_embeddings=False, **ids)
    config = llava_config(spec, tokenizer, text_config, dict(VISION))
    processor = llava_processor(spec, tokenizer)
    config.architectures = [family_spec(spec.family).model_class]
    config.dtype = "bfloat16"
    tmp = out.with_name(out.name + ".tmp")
    config.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tf.GenerationConfig(**ids, do_sample=False).save_pretrained(tmp)
    tmp.rename(out)
    return out


# -- the rows ------------------------------------------------------------------------------------
def _photo(name: str):
    import numpy as np
    from PIL import Image
    from skimage import data

    arr = data.stereo_motorcycle()[0 if name.endswith("left") else 1] if name.startswith("motorcycle") else getattr(data, name)()
    return Image.fromarray(np.asarray(arr)).convert("RGB")


def build_rows(n: int, out: Path, seed: int = 0) -> Path:
    """n rows {id, image (JPEG), prompt}: a random crop of a photo resized to a camera size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if out.is_file() and pq.read_metadata(out).num_rows == n:
        return out
    rng = random.Random(seed)
    photos = {p: _photo(p) for p in PHOTOS}
    rows = []
    for i in range(n):
        img = photos[PHOTOS[i % len(PHOTOS)]]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        size = SIZES[rng.randrange(len(SIZES))]
        buf = io.BytesIO()
        img.crop((left, top, left + cw, top + ch)).resize(size, resample=3).save(buf, "JPEG", quality=90)
        rows.append({"id": f"r{i:05d}", "image": buf.getvalue(), "prompt": PROMPTS[i % len(PROMPTS)]})
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


def _read_rows(path: Path, limit: int | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return rows[:limit] if limit else rows


def _chat_prompts(model_dir: Path, rows: list[dict]) -> list[str]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    return [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
                                          add_generation_prompt=True) for r in rows]


def _decode(rows: list[dict]):
    from PIL import Image

    return [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]


def _op_window(summary, needle: str) -> tuple[float, str]:
    """(busy seconds, name) of the Ray Data operator whose name holds `needle` (operators
    upstream of the last one sit in the summary's `parents`)."""
    todo = [summary]
    while todo:
        s = todo.pop()
        for op in s.operators_stats:
            if needle in op.operator_name:
                return op.latest_end_time - op.earliest_start_time, op.operator_name
        todo.extend(s.parents)
    raise KeyError(f"no Ray Data operator named like {needle!r}")


# -- the systems (each in its own process) -------------------------------------------------------
def system_a(model_dir: Path, rows_path: Path, work: Path, args) -> dict:
    """Our job's Dataset: read -> repartition -> PreprocessStage -> vLLM model stage -> Parquet."""
    import pyarrow.dataset as pads
    import ray

    from pipeline.checks import check_environment
    from pipeline.config import load_config
    from pipeline.inputs import inspect_input
    from pipeline.job import build_dataset
    from pipeline.readers import open_input

    cfg = load_config({
        "model": {"name": str(model_dir), "dtype": "bfloat16"},
        "backend": "vllm",
        "generation": {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS},
        "input": {"path": str(rows_path)},
        "output": {"path": str(work / "out-a"), "mode": "overwrite"},
        "resources": {"preprocess_actors": args.cpu_actors, "preprocess_cpus": 1, "preprocess_batch_size": 16,
                      "model_actors": 1, "model_cpus": 1, "num_gpus_per_actor": 1,
                      "model_batch_size": args.batch_size, "rows_per_block": args.batch_size},
        "limits": {"max_images_per_row": 1},
        "vllm": ENGINE | {"limit_mm_per_prompt": 1, "batches_in_flight": args.batches_in_flight},
    })
    check_environment(cfg)  # as run_job does
    shutil.rmtree(cfg.output.path, ignore_errors=True)
    ray.init(configure_logging=False)
    plan = inspect_input(cfg, open_input(cfg))
    start = time.perf_counter()
    ds = build_dataset(cfg, plan)
    ds.write_parquet(cfg.output.path)
    wall = time.perf_counter() - start
    window, op = _op_window(ds.get_stats_summary(), "Generate")
    out = pads.dataset(cfg.output.path).to_table(columns=["error", "prompt_tokens", "completion_tokens"]).to_pylist()
    errors = [r["error"] for r in out if r["error"]]
    return dict(rows=len(out), errors=len(errors), first_error=errors[0] if errors else None, wall_s=wall,
                busy_s=window, operator=op, generated_tokens=sum(r["completion_tokens"] for r in out),
                prompt_tokens=[r["prompt_tokens"] for r in out], config=cfg.model_dump(mode="json", include={"resources", "vllm"}))


def system_b(model_dir: Path, rows_path: Path, work: Path, args) -> dict:
    """Bare vLLM: the same prompts and decoded full-size images, one LLM.generate call."""
    from vllm import LLM, SamplingParams

    rows = _read_rows(rows_path)
    prompts, images = _chat_prompts(model_dir, rows), _decode(rows)
    start = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="bfloat16", limit_mm_per_prompt={"image": 1}, **ENGINE)
    loaded = time.perf_counter()
    outputs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)],
                           SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    done = time.perf_counter()
    return dict(rows=len(outputs), errors=0, wall_s=done - start, busy_s=done - loaded,
                generated_tokens=sum(len(o.outputs[0].token_ids) for o in outputs))


def system_c(model_dir: Path, rows_path: Path, work: Path, args) -> dict:
    """ray.data.llm's vLLM processor: multimodal stage (data URIs) -> chat template -> engine."""
    import base64

    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=str(model_dir),
        engine_kwargs=dict(ENGINE, dtype="bfloat16", limit_mm_per_prompt={"image": 1}),
        batch_size=args.batch_size,
        concurrency=1,
        # Its CPU stages get as many actors as our preprocess stage (a fair share of the host).
        prepare_multimodal_stage={"enabled": True, "chat_template_content_format": "openai", "concurrency": args.cpu_actors},
        chat_template_stage={"enabled": True, "concurrency": args.cpu_actors},
        tokenize_stage=False,  # vLLM tokenises the prompt and expands the image itself
        detokenize_stage=False,  # vLLM detokenises as it generates
    )

    def preprocess(row: dict) -> dict:
        uri = "data:image/jpeg;base64," + base64.b64encode(row["image"]).decode()
        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": row["prompt"]}]
        return dict(id=row["id"], messages=[{"role": "user", "content": content}],
                    sampling_params=dict(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))

    processor = build_processor(config, preprocess=preprocess,
                                postprocess=lambda row: dict(id=row["id"], n=row["num_generated_tokens"]))
    shutil.rmtree(work / "out-c", ignore_errors=True)
    ray.init(configure_logging=False)
    start = time.perf_counter()
    ds = processor(ray.data.read_parquet(str(rows_path)))
    ds.write_parquet(str(work / "out-c"))
    wall = time.perf_counter() - start
    window, op = _op_window(ds.get_stats_summary(), "vLLMEngineStage")
    out = ray.data.read_parquet(str(work / "out-c")).to_pandas()
    return dict(rows=len(out), errors=0, wall_s=wall, busy_s=window, operator=op, generated_tokens=int(out["n"].sum()))


def system_d(model_dir: Path, rows_path: Path, work: Path, args) -> dict:
    """The model card's loop: processor + generate, one row at a time, bf16, sdpa."""
    import torch
    import transformers as tf

    rows = _read_rows(rows_path, args.hf_rows + 1)
    prompts, images = _chat_prompts(model_dir, rows), _decode(rows)
    config = tf.AutoConfig.from_pretrained(model_dir)
    processor = tf.AutoProcessor.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = getattr(tf, config.architectures[0])._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    tokens, start = 0, None
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        if i == 1:  # row 0 warms up kernels and allocator
            torch.cuda.synchronize()
            start = time.perf_counter()
        inputs = processor(images=image, text=prompt, return_tensors="pt").to("cuda", torch.bfloat16)
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        tokens += (out.shape[1] - inputs["input_ids"].shape[1]) if i else 0
    torch.cuda.synchronize()
    busy = time.perf_counter() - start
    return dict(rows=len(rows) - 1, errors=0, wall_s=busy, busy_s=busy, generated_tokens=tokens)


SYSTEMS = {"a": system_a, "b": system_b, "c": system_c, "d": system_d}
NAMES = {"a": "our job (vLLM backend)", "b": "bare vllm.LLM.generate", "c": "ray.data.llm vLLM processor",
         "d": "HF model-card loop"}


# -- model FLOPs ---------------------------------------------------------------------------------
def tiles_per_row(name: str, rows_path: Path) -> list[int]:
    """Vision tiles each row runs through CLIP: 1 (LLaVA-1.5), 1 + the AnyRes grid (NeXT)."""
    import pyarrow.parquet as pq
    from PIL import Image

    if ARCHS[name].family == "llava":
        return [1] * pq.read_metadata(rows_path).num_rows
    from transformers.image_processing_utils import select_best_resolution

    out = []
    for image in pq.read_table(rows_path, columns=["image"]).column(0).to_pylist():
        w, h = Image.open(io.BytesIO(image)).size
        bh, bw = select_best_resolution((h, w), NEXT_PINPOINTS)
        out.append(1 + (bh // 336) * (bw // 336))
    return out


def linear_params(name: str) -> tuple[int, int]:
    """(weights of the language model's matmuls incl. lm_head, weights of one CLIP layer)."""
    t = ARCHS[name].text
    d, ff, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = d * t["num_key_value_heads"] // t["num_attention_heads"]
    dv, ffv = VISION["hidden_size"], VISION["intermediate_size"]
    return layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * VOCAB, 4 * dv * dv + 2 * dv * ffv


def model_flops(name: str, prompt_tokens: list[int], tiles: list[int], new_tokens: int) -> float:
    """Matmul FLOPs of the rows: 2 x weights x tokens for every linear layer (LM incl. lm_head,
    projector, the 23 CLIP layers vLLM runs for feature layer -2) plus attention scores and
    values (causal prefill 2*d*L^2 per layer, decode 4*d*pos per token per layer)."""
    t = ARCHS[name].text
    d, layers = t["hidden_size"], t["num_hidden_layers"]
    lm, clip_layer = linear_params(name)
    dv, vt = VISION["hidden_size"], (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1
    vision_per_tile = 23 * (2 * clip_layer * vt + 4 * dv * vt * vt)
    projector = 2 * (dv * d + d * d)
    total = 0.0
    for prompt, n_tiles in zip(prompt_tokens, tiles):
        seq = prompt + new_tokens
        attention = layers * (2 * d * prompt * prompt + sum(4 * d * p for p in range(prompt, seq)))
        image_tokens = n_tiles * (vt - 1)  # upper bound: NeXT drops padding rows and adds newlines
        total += 2 * lm * seq + attention + n_tiles * vision_per_tile + projector * image_tokens
    return total


# -- orchestration -------------------------------------------------------------------------------
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vllm", "ray", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    build_model_dir(args.model, work / args.model)  # the system processes read it from there
    rows_path = build_rows(args.rows, work / f"rows-{args.rows}.parquet")
    import torch

    result = dict(model=args.model, arch=ARCHS[args.model].text, gpu=torch.cuda.get_device_name(0), rows=args.rows,
                  hf_rows=args.hf_rows, new_tokens=NEW_TOKENS, engine=ENGINE, versions=_versions(), systems={})
    out = Path(args.out)
    for key in args.systems.split(","):
        cmd = [sys.executable, __file__, "system", key, "--model", args.model, "--work", str(work),
               "--rows", str(args.rows), "--hf-rows", str(args.hf_rows), "--batch-size", str(args.batch_size),
               "--batches-in-flight", str(args.batches_in_flight), "--cpu-actors", str(args.cpu_actors)]
        logger.info("system %s: %s", key, NAMES[key])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            res = json.loads((work / f"result-{key}.json").read_text()) if proc.returncode == 0 else \
                {"error": f"exit {proc.returncode}: " + proc.stderr[-3000:]}
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {args.timeout} s"}
        if key == "a" and "prompt_tokens" in res:
            res["model_flops"] = model_flops(args.model, res.pop("prompt_tokens"), tiles_per_row(args.model, rows_path), NEW_TOKENS)
        result["systems"][key] = res
        out.write_text(json.dumps(result, indent=1))  # after each system: a timeout keeps the rest
        logger.info("system %s: %s", key, {k: v for k, v in res.items() if k != "config"})


def system(args) -> None:
    work = Path(args.work)
    res = SYSTEMS[args.key](work / args.model, work / f"rows-{args.rows}.parquet", work, args)
    (work / f"result-{args.key}.json").write_text(json.dumps(res))


def summarize(result: dict) -> dict:
    """images/s, tokens/s per system, the ratios against the targets, and (a)'s MFU."""
    rates = {}
    for key, res in result["systems"].items():
        if "busy_s" in res:
            rates[key] = dict(images_per_s=res["rows"] / res["busy_s"], tokens_per_s=res["generated_tokens"] / res["busy_s"],
                              end_to_end_images_per_s=res["rows"] / res["wall_s"])
    ratios = {f"a/{k}": rates["a"]["images_per_s"] / rates[k]["images_per_s"] for k in "bcd" if "a" in rates and k in rates}
    a = result["systems"].get("a", {})
    peak = next((v for k, v in PEAK_BF16.items() if k in result["gpu"]), None)
    mfu = a["model_flops"] / a["busy_s"] / peak if peak and "model_flops" in a else None
    return dict(rates=rates, ratios=ratios, targets={"a/b": 0.95, "a/c": 1.0, "a/d": 10.0}, mfu_a=mfu)


def report(args) -> None:
    """Merge result files by model (systems may come from separate runs), then print the table."""
    by_model: dict[str, dict] = {}
    for path in args.files:
        result = json.loads(Path(path).read_text())
        merged = by_model.setdefault(result["model"], {**result, "systems": {}})
        merged["systems"].update(result["systems"])
    print("| model | system | rows | images/s | generated tokens/s | end-to-end images/s | a / this |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for result in by_model.values():
        result["summary"] = s = summarize(result)
        for key, res in sorted(result["systems"].items()):
            if key not in s["rates"]:
                print(f"| {result['model']} | {key}: {NAMES[key]} | - | {res.get('error', '?')[:80]} | | | |")
                continue
            r = s["rates"][key]
            ratio = s["ratios"].get(f"a/{key}")
            print(f"| {result['model']} | {key}: {NAMES[key]} | {res['rows']} | {r['images_per_s']:.2f} | "
                  f"{r['tokens_per_s']:.0f} | {r['end_to_end_images_per_s']:.2f} | {f'{ratio:.2f}' if ratio else ''} |")
        if s["mfu_a"] is not None:
            print(f"| {result['model']} | a: model FLOPs utilisation | | {100 * s['mfu_a']:.1f}% of {result['gpu']} bf16 peak | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps(list(by_model.values()), indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "system"):
        sp = sub.add_parser(name)
        if name == "system":
            sp.add_argument("key", choices=sorted(SYSTEMS))
        sp.add_argument("--model", choices=sorted(ARCHS), required=True)
        sp.add_argument("--work", default="/tmp/llava-ray-bench")
        sp.add_argument("--rows", type=int, default=512)
        sp.add_argument("--hf-rows", type=int, default=12)
        sp.add_argument("--batch-size", type=int, default=64, help="rows per engine batch (a, c)")
        sp.add_argument("--batches-in-flight", type=int, default=4, help="vllm.batches_in_flight (a)")
        sp.add_argument("--cpu-actors", type=int, default=8, help="preprocess actors (a)")
        if name == "run":
            sp.add_argument("--systems", default="a,b,c,d")
            sp.add_argument("--timeout", type=int, default=300, help="seconds per system")
            sp.add_argument("--out", required=True)
    rp = sub.add_parser("report")
    rp.add_argument("files", nargs="+")
    rp.add_argument("--json", help="also write the merged results with ratios and MFU here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    {"run": run, "system": system, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
