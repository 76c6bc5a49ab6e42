"""How busy the machine's cores are during each test of the suite: a pytest plugin.

    PYTHONPATH=benchmarks .venv/bin/python -m pytest -p suite_busy            # the whole suite
    SUITE_BUSY_OUT=/tmp/busy.json PYTHONPATH=benchmarks .venv/bin/python -m pytest -p suite_busy tests/pipeline

Around each test (setup, call and teardown) it reads /proc/stat: the whole machine's busy CPU
seconds, Ray's processes and the jobs' subprocesses included. Idle core-seconds (cores x wall -
busy) are what running tests side by side could fill at best. The summary (totals and the tests
that leave most idle) goes to benchmarks/results/suite_busy.json unless SUITE_BUSY_OUT says.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from report import cpu_jiffies  # benchmarks/report.py, beside this plugin

OUT = Path(__file__).resolve().parent / "results" / "suite_busy.json"
TOP = 20
_tests: list[dict] = []


def _busy_s() -> float:
    return cpu_jiffies()[0] / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0, b0 = time.monotonic(), _busy_s()
    yield
    _tests.append({"test": item.nodeid, "wall_s": round(time.monotonic() - t0, 2), "busy_cpu_s": round(_busy_s() - b0, 2)})


def summary(tests: list[dict], cores: int) -> dict:
    for t in tests:
        t["idle_cpu_s"] = round(cores * t["wall_s"] - t["busy_cpu_s"], 2)
    wall, busy = sum(t["wall_s"] for t in tests), sum(t["busy_cpu_s"] for t in tests)
    idle = sorted(tests, key=lambda t: -t["idle_cpu_s"])
    total_idle, running, half = sum(t["idle_cpu_s"] for t in tests), 0.0, 0
    while running < total_idle / 2:
        running += idle[half]["idle_cpu_s"]
        half += 1
    return {"benchmark": "suite_busy", "cores": cores, "tests": len(tests), "wall_s": round(wall, 1),
            "busy_cpu_s": round(busy, 1), "busy_share": round(busy / (cores * wall), 3),
            "idle_cpu_s": round(total_idle, 1), "tests_holding_half_the_idle": half, "most_idle": idle[:TOP]}


def pytest_sessionfinish(session, exitstatus):
    if _tests:
        out = Path(os.environ.get("SUITE_BUSY_OUT", OUT))
        out.write_text(json.dumps(summary(_tests, os.cpu_count()), indent=1) + "\n")
