"""Prometheus series of the Serve app and the batch jobs, through Ray's metrics API (`ray.util.metrics`):
each is declared here once, recorded in the process that sees it (the ingress, a model replica, a job's
counter actor), and exported by Ray's own metrics endpoint on every node (`metrics_export_port`), which
Ray's Prometheus service discovery finds. No second exporter.

Ray prefixes the names with `ray_`, and counters end in `_total`:

    ray_pixelray_serve_requests_total{model, route, status, error}   HTTP requests answered
    ray_pixelray_serve_request_seconds_bucket{model, route, le}      total latency, arrival to last byte
    ray_pixelray_serve_ttft_seconds_bucket{model, le}                 time to first token, from the replica
    ray_pixelray_serve_tokens_total{model, kind}                     prompt and generated tokens
    ray_pixelray_serve_batch_size_bucket{model, le}                  requests per generate() call
    ray_pixelray_serve_queue_length{model}                           requests waiting for a batch
    ray_pixelray_serve_images_total{outcome, reason}                 images decoded, and refused by reason
    ray_pixelray_job_items_total{job, store}                         items a batch job has done (errors too)
    ray_pixelray_job_errors_total{job, store, error_type}            its error rows by type

Ray Data exports each stage's rows itself (`ray_data_output_rows{dataset, operator}`), and a vllm model's
engine its own `ray_vllm_*` series. cluster/monitoring/grafana-dashboard.json charts all of them (README: Metrics).
Ray keeps histograms by bucket: their counts are exact, their sums are bucket midpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ray.util import metrics

# Quantiles are interpolated within a bucket, so the buckets are close (about 1.5x apart); sizes are whole
# numbers, so their bounds fall between them: 1, 2, 3 and 4 each have a bucket of their own.
SECONDS = [0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30,
           45, 60, 90, 120, 180, 300]
SIZES = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 32.5, 48.5, 64.5, 96.5, 128.5, 256.5]


@dataclass
class Series:
    """One series, made in the process that first records it (a Ray metric belongs to its worker)."""

    kind: type[metrics.Metric]
    name: str
    description: str
    tags: tuple[str, ...] = ()
    boundaries: list[float] | None = None
    _metric: Any = field(default=None, init=False, repr=False)

    @property
    def metric(self) -> Any:
        if self._metric is None:
            extra = {"boundaries": self.boundaries} if self.boundaries else {}
            self._metric = self.kind(self.name, description=self.description, tag_keys=self.tags, **extra)
        return self._metric

    def inc(self, value: float = 1.0, **tags: str) -> None:
        if value:
            self.metric.inc(value, tags=tags)

    def observe(self, value: float, **tags: str) -> None:
        self.metric.observe(value, tags=tags)

    def set(self, value: float, **tags: str) -> None:
        self.metric.set(value, tags=tags)


SERVE_REQUESTS = Series(metrics.Counter, "pixelray_serve_requests",
                        "HTTP requests answered, by model, route, status and error type (empty: none)",
                        ("model", "route", "status", "error"))
SERVE_REQUEST_SECONDS = Series(metrics.Histogram, "pixelray_serve_request_seconds",
                               "seconds from a request's arrival at the ingress to its last byte",
                               ("model", "route"), SECONDS)
SERVE_TTFT = Series(metrics.Histogram, "pixelray_serve_ttft_seconds",
                    "seconds from a request's arrival at the model replica to its first generated token",
                    ("model",), SECONDS)
SERVE_TOKENS = Series(metrics.Counter, "pixelray_serve_tokens", "tokens by kind: prompt (images included) or "
                      "generated", ("model", "kind"))
SERVE_BATCH_SIZE = Series(metrics.Histogram, "pixelray_serve_batch_size", "requests generated together in one "
                          "call", ("model",), SIZES)
SERVE_QUEUE = Series(metrics.Gauge, "pixelray_serve_queue_length", "requests at a replica waiting for a batch",
                     ("model",))
SERVE_IMAGES = Series(metrics.Counter, "pixelray_serve_images", "request images decoded, and refused (reason: "
                      "the error code)", ("outcome", "reason"))
JOB_ITEMS = Series(metrics.Counter, "pixelray_job_items", "items a batch job has done, error rows included",
                   ("job", "store"))
JOB_ERRORS = Series(metrics.Counter, "pixelray_job_errors", "a batch job's error rows by error_type",
                    ("job", "store", "error_type"))

ALL = [SERVE_REQUESTS, SERVE_REQUEST_SECONDS, SERVE_TTFT, SERVE_TOKENS, SERVE_BATCH_SIZE, SERVE_QUEUE, SERVE_IMAGES,
       JOB_ITEMS, JOB_ERRORS]


def exported(series: Series) -> list[str]:
    """The names Prometheus sees for `series` (a histogram's three)."""
    name = "ray_" + series.name
    if series.kind is metrics.Counter:
        return [name + "_total"]
    if series.kind is metrics.Histogram:
        return [name + "_bucket", name + "_count", name + "_sum"]
    return [name]


class Reply:
    """Times one streamed reply as its pieces pass: the first text piece is its first token, the
    GenerationResult (last) its figures.

        reply = telemetry.Reply(model)
        for piece in pieces:
            yield reply.saw(piece)
    """

    def __init__(self, model: str):
        self.model, self.arrived, self.first_at = model, time.perf_counter(), None

    def saw(self, piece):
        if isinstance(piece, str):
            self.first_at = self.first_at or time.perf_counter()
        else:
            generated(self.model, piece, self.arrived, self.first_at)
        return piece


def generated(model: str, result, arrived: float, first_token_at: float | None) -> None:
    """A reply's figures: its tokens, and its time to first token when it was seen."""
    SERVE_TOKENS.inc(result.num_tokens, model=model, kind="generated")
    SERVE_TOKENS.inc(result.prompt_tokens, model=model, kind="prompt")
    if first_token_at is not None:
        SERVE_TTFT.observe(first_token_at - arrived, model=model)
