"""benchmarks/suite_busy.py, the pytest plugin behind the suite's busy/idle figures, run on two
small tests in a pytest of its own: one burns CPU in its process, one sleeps."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

TESTS = '''
import os
import time

def test_burns():
    start = time.process_time()
    while time.process_time() - start < 0.5:
        pass
    with open(os.environ["BURNED"], "w") as f:
        f.write(str(time.process_time() - start))

def test_sleeps():
    time.sleep(0.5)
'''


def test_each_test_counts_at_least_its_own_cpu_and_the_summary_adds_up(tmp_path):
    (tmp_path / "test_two.py").write_text(TESTS)
    out, burned = tmp_path / "busy.json", tmp_path / "burned"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks"), "SUITE_BUSY_OUT": str(out), "BURNED": str(burned)}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "suite_busy", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_two.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    s = json.loads(out.read_text())
    tests = {t["test"].split("::")[1]: t for t in s["most_idle"]}
    assert (s["tests"], set(tests), s["cores"]) == (2, {"test_burns", "test_sleeps"}, os.cpu_count())
    # The machine's busy seconds include the burning process's own (less a clock tick or two).
    assert tests["test_burns"]["busy_cpu_s"] >= float(burned.read_text()) - 0.05
    assert tests["test_sleeps"]["wall_s"] >= 0.5
    for t in tests.values():
        assert t["idle_cpu_s"] == round(s["cores"] * t["wall_s"] - t["busy_cpu_s"], 2)
    assert s["busy_cpu_s"] == round(sum(t["busy_cpu_s"] for t in tests.values()), 1)
