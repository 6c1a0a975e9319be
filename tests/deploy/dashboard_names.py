"""Helpers shared by the deployment tests: which metric names a scrape exports and which ones
the Grafana dashboard queries.

Kept free of test code so that both the static test (``Metrics().render()``) and a live test
(scraping ``GET /metrics`` of a running server) can compare the two sets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# A metric name of ours inside a PromQL expression (not preceded by another identifier char).
METRIC_NAME_RE = re.compile(r"(?<![A-Za-z0-9_:])llada_[a-z_]+")

# Sample names a family of each type may export (what PromQL can select), by suffix.
_TYPE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def exported_sample_names(text: str) -> set[str]:
    """Every sample name a Prometheus text exposition exports.

    Includes the names that appear as samples and, for each family, the names its type implies
    (``_total`` for a counter, ``_bucket``/``_sum``/``_count`` for a histogram): a labelled
    metric that has not been used yet has its ``# TYPE`` line but no samples, and a dashboard
    may still rightly query it.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        for suffix in _TYPE_SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """All panels, descending into (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def load_dashboard(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def dashboard_exprs(path: str | Path) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    dashboard = load_dashboard(path)
    exprs: list[str] = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets") or []:
            if target.get("expr"):
                exprs.append(target["expr"])
    for var in (dashboard.get("templating") or {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if query:
            exprs.append(query)
    return exprs


def dashboard_metric_names(path: str | Path) -> set[str]:
    """Every ``llada_*`` metric name the dashboard at ``path`` queries."""
    names: set[str] = set()
    for expr in dashboard_exprs(path):
        names.update(METRIC_NAME_RE.findall(expr))
    return names
