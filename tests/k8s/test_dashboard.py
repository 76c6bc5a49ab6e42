"""The Grafana dashboard in k8s/dashboards/ queries only metrics the code exports."""

import json
import re

from pipeline import metrics
from tests.conftest import ROOT

DASHBOARD = ROOT / "k8s" / "dashboards" / "llava-ray.json"


def _queried(expr: str) -> set[str]:
    """Metric names in a PromQL expression (histogram series back to their histogram)."""
    names = set(re.findall(r"\b(ray_[a-z_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_every_query_names_an_exported_metric():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exported = {metrics.exported(n) for n in metrics.COUNTERS + metrics.HISTOGRAMS}
    queried = {name for p in panels for t in p["targets"] for name in _queried(t["expr"])}
    assert queried and queried <= exported, queried - exported
    assert exported <= queried, f"metrics without a panel: {exported - queried}"  # and every metric has one


def test_the_check_would_see_a_misspelt_metric():
    assert _queried('sum(rate(ray_llava_ray_rows_totl[1m]))') == {"ray_llava_ray_rows_totl"}
    assert _queried("histogram_quantile(0.5, rate(ray_llava_ray_stage_seconds_bucket[5m]))") == {"ray_llava_ray_stage_seconds"}
