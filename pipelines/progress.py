"""The progress of a running job: items done (of the total, when it is known), items/s, ETA and errors so far.
On a terminal one line redrawn in place with a bar; otherwise (a log file, CI) a plain line every `every`
seconds.

    with Progress(total=2000, unit="images") as progress:
        ...the job writes progress.count(ds)...
    # [##########..............]  1,024/2,000 images  45.1/s  ETA 0:22  3 errors

The rate is the speed over the last 30 s, from the first items done ("starting" before: the model pool
loading), so the ETA is not thrown off by the start.

`tally` adds each block's rows and error rows, as the block leaves the model stage, to a small counter actor,
which the driver asks every update, and which exports them to Prometheus too (pixelray.telemetry:
pixelray_job_items and pixelray_job_errors, labelled with the job and the store).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pixelray import telemetry

BAR = 24  # characters of the bar
WINDOW = 30.0  # seconds: the rate is the speed over the last this many


@ray.remote(num_cpus=0)
class Counter:
    """Rows and error rows written so far."""

    def __init__(self, job: str, store: str):
        self.rows = self.errors = 0
        self.labels = {"job": job, "store": store}

    def add(self, rows: int, error_types: dict[str, int]) -> None:
        self.rows, self.errors = self.rows + rows, self.errors + sum(error_types.values())
        telemetry.JOB_ITEMS.inc(rows, **self.labels)
        for kind, n in error_types.items():
            telemetry.JOB_ERRORS.inc(n, error_type=kind, **self.labels)

    def totals(self) -> tuple[int, int]:
        return self.rows, self.errors


def tally(batch: pa.Table, counter) -> pa.Table:
    """A pipeline's last stage: count the batch (its rows with an `error` are errors, by their `error_type`)
    and pass it on as it is."""
    errors = {}
    if "error" in batch.column_names:
        kinds = batch.filter(pc.is_valid(batch["error"]))["error_type"]
        errors = {row["values"] or "unknown": row["counts"] for row in pc.value_counts(kinds).to_pylist()}
    # waited for: Ray orders an actor's calls per caller only, so a count sent and not waited for could still be on
    # its way when the driver, another caller, reads the totals after the last block
    ray.get(counter.add.remote(batch.num_rows, errors))
    return batch


class Progress:
    def __init__(self, total: int | None, unit: str = "images", stream: TextIO | None = None,
                 interval: float = 0.5, every: float = 10.0, job: str = "", store: str = ""):
        self.total, self.unit = total, unit
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval = interval if self.live else every
        self.counter = Counter.remote(job, store)
        self.done = self.errors = 0
        self.counts: deque[tuple[float, int]] = deque()  # (when, items done): the rate's window
        self._stop = threading.Event()

    def update(self) -> None:
        try:
            self.done, self.errors = ray.get(self.counter.totals.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError):  # (the line keeps its last figures)
            pass

    def count(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """`ds`, its rows counted as each block leaves the model stage: a light stage of its own (its resources
        differ from the write's, so Ray Data does not fuse it into the write, which waits for a file's rows),
        one task at a time (a fraction of a CPU would otherwise let Ray start a worker process per block)."""
        return ds.map_batches(tally, batch_size=None, batch_format="pyarrow", zero_copy_batch=True, num_cpus=0.05,
                              compute=ray.data.TaskPoolStrategy(size=1), fn_kwargs={"counter": self.counter})

    def rate(self, now: float) -> float | None:
        """Items/s over the last WINDOW seconds, from the first count with items in it (the pool's start, its
        models loading, is not), so the ETA follows the speed as it is now; None before two such counts."""
        if self.done:
            self.counts.append((now, self.done))
        while len(self.counts) > 2 and now - self.counts[1][0] >= WINDOW:
            self.counts.popleft()
        if len(self.counts) < 2 or now <= self.counts[0][0]:
            return None
        then, done = self.counts[0]
        return (self.done - done) / (now - then)

    def line(self, rate: float | None) -> str:
        parts = []
        if self.total:
            filled = min(BAR, round(BAR * self.done / self.total))
            parts.append(f"[{'#' * filled}{'.' * (BAR - filled)}] {self.done:,}/{self.total:,} {self.unit}")
        else:
            parts.append(f"{self.done:,} {self.unit}")
        parts.append("starting" if rate is None else f"{rate:.1f}/s")
        if self.total and rate and self.done < self.total:
            left = int((self.total - self.done) / rate)
            parts.append(f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}" if left >= 3600
                         else f"ETA {left // 60}:{left % 60:02d}")
        parts.append(f"{self.errors:,} errors")
        return "  ".join(parts)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.update()
            self._show(self.line(self.rate(time.monotonic())))
        self.update()
        self._show(self.line(self.rate(time.monotonic())), last=True)

    def _show(self, text: str, last: bool = False) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if last else ""))
        elif not last:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        ray.kill(self.counter)
