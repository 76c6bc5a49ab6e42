"""`llava-ray run|plan|serve|demo|tiny-model|check-config`: the user-facing output lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import Config, load_config
from .errors import ERROR_KINDS, ConfigError, JobError
from .layouts import LAYOUTS

TINY_LAYOUTS = {"llava", "llava-next", *(spec.short_name for spec in LAYOUTS.values())}

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-ray", description="LLaVA / LLaVA-NeXT on Ray: offline jobs and an endpoint")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("config", help="job / serve YAML (see configs/)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. generation.max_new_tokens=32")
        return sp

    run = with_config("run", "run an offline job")
    run.add_argument("--retry-failed", nargs="?", const="all", metavar="KINDS",
                     help=f"re-run rows whose output has an error; or only these error kinds, e.g. fetch,engine ({', '.join(ERROR_KINDS)})")
    with_config("serve", "serve the OpenAI-compatible endpoint on local Ray")
    with_config("check-config", "validate a config (and this machine) without running")
    plan = with_config("plan", "what a job will cost and which rows will fail, from image headers, without the model")
    plan.add_argument("--sample", type=int, metavar="N", help="plan a uniform sample of N rows and scale the totals up")
    plan.add_argument("--json", metavar="PATH", help="write the totals as JSON")
    plan.add_argument("--rows", metavar="PATH", help="write each row's counts and predicted error as Parquet")
    plan.add_argument("--mfu", type=float, metavar="F", help="model FLOPs utilisation the GPU times assume (plan.mfu)")
    demo = sub.add_parser("demo", help="tiny model + real photos, end to end on local Ray")
    demo.add_argument("--config", default="configs/demo.yaml")
    tiny = sub.add_parser("tiny-model", help="build a tiny random LLaVA / LLaVA-NeXT checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--layout", choices=sorted(TINY_LAYOUTS), default="llava-1.5-7b",
                      help="the checkpoint layout to build (pipeline/layouts.py); llava / llava-next: the family's default")
    tiny.add_argument("--hidden", type=int, default=64, help="text/vision width (multiples of 64 for bitsandbytes)")
    tiny.add_argument("--layers", type=int, default=2)
    return p


def print_summary(summary) -> None:
    s = summary
    print(
        f"rows ok: {s.rows_ok}  rows failed: {s.rows_failed}  (total {s.rows_total}, processed this run {s.rows_processed}"
        + (f", dropped duplicates {s.dropped_duplicates}" if s.dropped_duplicates else "")
        + ")"
    )
    if s.failed_by_kind:
        print("failures by kind: " + ", ".join(f"{k} {n}" for k, n in s.failed_by_kind.items()))
    print(f"{s.records_per_s:.2f} rec/s, {s.tokens_per_s:.1f} generated tokens/s in {s.seconds:.1f} s")
    if s.backend:
        print(f"model: {s.model}  backend: {s.backend}")
    print(f"output: {s.output_path}")


def print_rows(cfg: Config) -> None:
    from .storage import output_rows

    table = output_rows(cfg.output.path, cfg.storage, [cfg.input.columns.id, "text", "error"])
    rows = sorted(table.to_pylist(), key=lambda r: str(r[cfg.input.columns.id]))
    print(f"{'id':<20} {'text':<50} error")
    for r in rows:
        text = (r["text"] or "").replace("\n", " ")
        print(f"{str(r[cfg.input.columns.id]):<20} {text[:50]:<50} {r['error'] or ''}")


def _config(args, overrides: list[str] | None = None) -> Config:
    """The command's config. This process runs no model (its actors and replicas do): unless the
    checks ask torch for a GPU, torch is left out of it (`checkpoint.leave_out`), so its
    checks start in ~1.2 s instead of ~5 and the driver holds ~270 MB less."""
    from .checkpoint import TORCH, leave_out
    from .checks import asks_for_a_gpu

    cfg = load_config(args.config, args.set if overrides is None else overrides)
    if not asks_for_a_gpu(cfg):
        leave_out(cfg.model, TORCH)
    return cfg


def _run(args) -> int:
    from .job import run_job

    cfg = _config(args)
    print_summary(run_job(cfg, retry_failed=_kinds(args.retry_failed)))
    return 0


def _kinds(value: str | None) -> bool | list[str]:
    if value is None or value == "all":
        return value == "all"
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ERROR_KINDS]
    if unknown or not kinds:
        raise ConfigError("--retry-failed", f"unknown error kinds {unknown}; use some of {', '.join(ERROR_KINDS)}")
    return kinds


def _demo(args) -> int:
    from .demo import write_demo_input
    from .job import run_job

    cfg = _config(args, [])
    write_demo_input(cfg.input.path)
    summary = run_job(cfg)
    print_rows(cfg)
    print_summary(summary)
    return 0


def _serve(args) -> int:
    from deployments.app import serve_local

    serve_local(_config(args), on_ready=lambda url: print(f"serving at {url}  (OpenAI base_url; Ctrl-C to stop)", flush=True))
    return 0


def _check(args) -> int:
    from .checks import check_environment

    cfg = _config(args)
    checkpoint = check_environment(cfg)
    print(f"ok: {args.config} ({cfg.backend}, model {cfg.model.name})")
    images = checkpoint.images
    print(f"family: {checkpoint.family.name}  image processor: {images.describe()}")
    per_image = f"{images.max_tokens}" if not images.anyres else f"up to {images.max_tokens} (AnyRes, by image size)"
    print(f"image tokens per image: {per_image}  context: {checkpoint.context_len} tokens")
    return 0


def _plan(args) -> int:
    from .plan import plan_job, write_rows

    overrides = args.set + ([f"plan.mfu={args.mfu}"] if args.mfu is not None else [])
    cfg = _config(args, overrides)
    report, per_row = plan_job(cfg, args.sample)
    print_plan(args.config, report)
    if args.json:
        Path(args.json).write_text(report.model_dump_json(indent=2) + "\n")
        print(f"totals: {args.json}")
    if args.rows:
        write_rows(per_row, args.rows, cfg)
        print(f"rows: {args.rows}")
    return 0


def print_plan(config: str, r) -> None:
    n = lambda x: f"{x:,}"  # noqa: E731
    print(f"plan of {config}: model {r.model} ({r.family}, backend {r.backend})")
    if r.sampled:
        print(f"SAMPLE: {n(r.rows_planned)} of {n(r.rows)} rows, drawn uniformly; every total below is scaled x{r.scale:,.4g}")
    print(f"{'rows':<15}{n(r.rows):>16}")
    print(f"{'  will run':<15}{n(r.rows_ok):>16}")
    failed = ", ".join(f"{k} {n(v)}" for k, v in r.failed_by_kind.items())
    print(f"{'  will fail':<15}{n(r.rows_failed):>16}" + (f"  ({failed})" if failed else ""))
    print(f"{'images':<15}{n(r.images):>16}  ({n(r.tiles)} tiles through the vision tower)")
    print(f"{'prompt tokens':<15}{n(r.prompt_tokens):>16}  = image {n(r.image_tokens)} + text {n(r.text_tokens)}")
    print(f"{'new tokens':<15}{n(r.new_tokens):>16}  at most: generation.max_new_tokens {r.max_new_tokens} x {n(r.rows_ok)} rows")
    if r.largest_row:
        big, needs = r.largest_row, r.needs
        print(f"{'largest row':<15}{big.id!r:>16}  {n(big.prompt_tokens)} prompt tokens ({n(big.image_tokens)} for {big.images} image(s))")
        fits = "fits" if needs.fits_model else "does NOT fit"
        print(f"{'needs':<15}{'':>16}  vllm.max_model_len >= {n(needs.max_model_len)} ({fits} the model's context); "
              f"vllm.limit_mm_per_prompt and limits.max_images_per_row >= {needs.max_images_per_row}")
    f = r.flops
    print(f"{'model FLOPs':<15}{f.total:>16.3e}  = vision {f.vision:.3e} + projector {f.projector:.3e} "
          f"+ prefill {f.prefill:.3e} + decode {f.decode:.3e}")
    print(f"\n{'GPU':<8}{'bf16 TFLOP/s':>14}{f'GPU-hours at {r.mfu:.0%} MFU':>26}{f'time on {r.model_actors} GPU(s)':>22}")
    for g in r.gpus:
        print(f"{g.gpu:<8}{g.peak_tflops:>14,.0f}{g.gpu_hours:>26.4g}{_duration(g.hours):>22}")
    print(f"\nplanned {n(r.rows_planned)} rows in {r.seconds:.1f} s ({r.rows_per_s:,.1f} rows/s)")


def _duration(hours: float) -> str:
    seconds = hours * 3600
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1), ("ms", 1e-3)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds * 1e6:.3g} us"


def _tiny(args) -> int:
    from .tiny import build_tiny_checkpoint

    out = build_tiny_checkpoint(args.dir, args.layout, text_hidden=args.hidden, vision_hidden=args.hidden, layers=args.layers)
    print(f"wrote {out}")
    return 0


COMMANDS = {"run": _run, "serve": _serve, "demo": _demo, "tiny-model": _tiny, "check-config": _check, "plan": _plan}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline.progress").setLevel(logging.INFO)  # progress lines show without -v (and without a TTY)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
