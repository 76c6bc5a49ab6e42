"""The benchmarks' shared epilogue: the results as JSON on stdout and in a file, the table in the log."""

from __future__ import annotations

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
