"""A Ray node's Prometheus endpoint, read as Prometheus reads it (the text format, parsed by
prometheus_client), for the tests and the benchmarks.

    samples = scrape(metrics_port())
    total(samples, "ray_pixelray_serve_requests_total", model="shapes-demo", status="200")
    total(since(before, samples), ...)       # what was added between two scrapes
    quantile(buckets(samples, "ray_pixelray_serve_ttft_seconds", model="shapes-demo"), 0.5)
"""

from __future__ import annotations

import urllib.request

import ray
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]


def metrics_port() -> int:
    """The metrics endpoint's port of the (first alive) node of the Ray instance this process is connected to."""
    return next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])


def scrape(port: int, host: str = "127.0.0.1") -> list[Sample]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def since(before: list[Sample], after: list[Sample]) -> list[Sample]:
    """`after`'s samples less their values in `before`, series by series, as rate() sees them: a series new
    since counts from 0, and one gone since (a dead worker's: Ray drops them) is left out, not subtracted."""
    earlier = {(n, tuple(sorted(labels.items()))): v for n, labels, v in before}
    return [(n, labels, v - earlier.get((n, tuple(sorted(labels.items()))), 0.0)) for n, labels, v in after]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (over workers, replicas, nodes)."""
    return sum(value for n, have, value in samples if n == name and all(have.get(k) == v for k, v in labels.items()))


def buckets(samples: list[Sample], name: str, **labels: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts, upper bound -> count (`name` without `_bucket`)."""
    bounds = {have["le"] for n, have, _ in samples if n == name + "_bucket"}
    return {float(le): total(samples, name + "_bucket", le=le, **labels) for le in bounds}


def quantile(counts: dict[float, float], q: float) -> float:
    """The q-quantile of cumulative bucket counts as Prometheus' histogram_quantile() estimates it: linear
    within the bucket it falls in (the highest finite bound when it falls in +Inf); nan when empty."""
    bounds = sorted(counts)
    if not bounds or counts[bounds[-1]] == 0:
        return float("nan")
    rank, lower, below = q * counts[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        if counts[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (counts[bound] - below)
        lower, below = bound, counts[bound]
    return lower
