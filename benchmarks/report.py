"""The benchmarks' shared epilogue: the results as JSON on stdout and in a file, the table in the log."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)


def write_report(report: dict, out: str | Path, markdown: Callable[[dict], str]) -> dict:
    text = json.dumps(report, indent=2)
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text + "\n")
    logger.info("wrote %s\n\n%s\n", out, markdown(report))
    return report


def cpu_jiffies() -> tuple[int, int]:
    """The whole machine's busy and total clock ticks since boot, from /proc/stat's first line
    (user nice system idle iowait irq softirq steal; guest time is already inside user)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def rounds_args(doc: str, argv: list[str] | None, rounds: int, out: Path) -> tuple[argparse.Namespace, int]:
    """The command line of a benchmark measured in rounds (--rounds, --quick, --out), logging set
    up; returns the arguments and the rounds to run."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=rounds, help="rounds per figure; the median counts")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds")
    p.add_argument("--out", default=str(out))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return args, 2 if args.quick else args.rounds
