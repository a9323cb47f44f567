"""The progress line of a job: rows and error rows counted as blocks leave the model stage, and the line drawn
from them (bar, rate, ETA, errors)."""

from __future__ import annotations

import io

import pyarrow as pa
import ray

from pixelray.pipelines.progress import Progress


def with_errors(batch: pa.Table) -> pa.Table:
    ids = batch["id"].to_numpy()
    return pa.table({"id": ids, "error": pa.array(["bad" if i % 10 == 0 else None for i in ids], pa.string())})


def test_rows_and_errors_are_counted_as_they_pass(ray_address):
    stream = io.StringIO()  # not a terminal: a plain line every `every` seconds, none at the end
    with Progress(total=200, unit="images", stream=stream, every=3600) as progress:
        ds = ray.data.range(200, override_num_blocks=8).map_batches(with_errors, batch_format="pyarrow")
        assert progress.count(ds).count() == 200
        progress.update()
        assert (progress.done, progress.errors) == (200, 20)
    assert stream.getvalue() == ""

    line = progress.line(elapsed=10.0)
    assert line == "[########################] 200/200 images  20.0/s  20 errors"
    progress.done = 50
    assert progress.line(elapsed=10.0) == "[######..................] 50/200 images  5.0/s  ETA 0:30  20 errors"
    progress.total = None
    assert progress.line(elapsed=10.0) == "50 images  5.0/s  20 errors"
