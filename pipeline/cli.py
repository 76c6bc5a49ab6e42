"""`llava-ray run|serve|demo|tiny-model|check-config`: the user-facing output lives here."""

from __future__ import annotations

import argparse
import logging
import sys

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


def _run(args) -> int:
    from .job import run_job

    cfg = load_config(args.config, args.set)
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

    cfg = load_config(args.config)
    write_demo_input(cfg.input.path)
    summary = run_job(cfg)
    print_rows(cfg)
    print_summary(summary)
    return 0


def _serve(args) -> int:
    from deployments.app import serve_local

    serve_local(load_config(args.config, args.set), on_ready=lambda url: print(f"serving at {url}  (OpenAI base_url; Ctrl-C to stop)", flush=True))
    return 0


def _check(args) -> int:
    from .checks import check_environment

    cfg = load_config(args.config, args.set)
    checkpoint = check_environment(cfg)
    print(f"ok: {args.config} ({cfg.backend}, model {cfg.model.name})")
    images = checkpoint.images
    print(f"family: {checkpoint.family.name}  image processor: {images.describe()}")
    per_image = f"{images.max_tokens}" if not images.anyres else f"up to {images.max_tokens} (AnyRes, by image size)"
    print(f"image tokens per image: {per_image}  context: {checkpoint.context_len} tokens")
    return 0


def _tiny(args) -> int:
    from .tiny import build_tiny_checkpoint

    out = build_tiny_checkpoint(args.dir, args.layout, text_hidden=args.hidden, vision_hidden=args.hidden, layers=args.layers)
    print(f"wrote {out}")
    return 0


COMMANDS = {"run": _run, "serve": _serve, "demo": _demo, "tiny-model": _tiny, "check-config": _check}


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
