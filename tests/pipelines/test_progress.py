"""The progress line of a job: rows and error rows counted as blocks leave the model stage, and the line drawn
from them (bar, rate, ETA, errors)."""

from __future__ import annotations

import io
from collections import deque

import pyarrow as pa
import ray

from pixelray.pipelines.progress import Progress
from pixelray.testing import wait_until
from pixelray.testing.prometheus import metrics_port, scrape, total


def with_errors(batch: pa.Table) -> pa.Table:
    ids = batch["id"].to_numpy()
    kinds = ["corrupt" if i % 20 == 0 else "not_an_image" if i % 10 == 0 else None for i in ids]
    return pa.table({"id": ids, "error_type": pa.array(kinds, pa.string()),
                     "error": pa.array([k and f"item {i} is bad" for i, k in zip(ids, kinds)], pa.string())})


def test_rows_and_errors_are_counted_as_they_pass(ray_address, tmp_path):
    stream = io.StringIO()  # not a terminal: a plain line every `every` seconds, none at the end
    store = str(tmp_path / "store")  # the series' label: no other test's
    with Progress(total=200, unit="images", stream=stream, every=3600, job="caption", store=store) as progress:
        ds = ray.data.range(200, override_num_blocks=8).map_batches(with_errors, batch_format="pyarrow")
        assert progress.count(ds).count() == 200
        progress.update()
        assert (progress.done, progress.errors) == (200, 20)
    assert stream.getvalue() == ""

    # and Prometheus sees the same counts (pixelray.telemetry, through Ray's metrics endpoint)
    def counted():
        samples = scrape(metrics_port())
        figures = [total(samples, "ray_pixelray_job_items_total", job="caption", store=store),
                   *(total(samples, "ray_pixelray_job_errors_total", store=store, error_type=kind)
                     for kind in ("corrupt", "not_an_image"))]
        return figures == [200, 10, 10]

    wait_until(counted, 60, "the job's series")

    line = progress.line(rate=20.0)
    assert line == "[########################] 200/200 images  20.0/s  20 errors"
    progress.done = 50
    assert progress.line(rate=5.0) == "[######..................] 50/200 images  5.0/s  ETA 0:30  20 errors"
    assert progress.line(rate=None) == "[######..................] 50/200 images  starting  20 errors"
    progress.total = None
    assert progress.line(rate=5.0) == "50 images  5.0/s  20 errors"


def test_the_rate_leaves_out_the_start_and_follows_the_last_30_s():
    progress = Progress.__new__(Progress)  # (no counter actor: only the arithmetic)
    progress.done, progress.counts = 0, deque()
    assert progress.rate(0.0) is None and progress.rate(40.0) is None  # 40 s of models loading: no items yet
    progress.done = 100
    assert progress.rate(41.0) is None  # one count: no speed yet
    progress.done = 300
    assert progress.rate(51.0) == 20.0  # 200 items in the 10 s since the first count, the 41 s before it not
    progress.done = 600
    assert progress.rate(81.0) == 10.0  # the last 30 s (51 s to 81 s): 300 items
