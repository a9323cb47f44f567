"""The progress of a running job: items done (of the total, when it is known), items/s, ETA and errors so far.
On a terminal one line redrawn in place with a bar; otherwise (a log file, CI) a plain line every `every`
seconds.

    with Progress(total=2000, unit="images") as progress:
        ...the job writes progress.count(ds)...
    # [##########..............]  1,024/2,000 images  45.1/s  ETA 0:22  3 errors

`tally` adds each block's rows and error rows, as the block leaves the model stage, to a small counter actor,
which the driver asks every update.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc
import ray

BAR = 24  # characters of the bar


@ray.remote(num_cpus=0)
class Counter:
    """Rows and error rows written so far."""

    def __init__(self):
        self.rows = self.errors = 0

    def add(self, rows: int, errors: int) -> None:
        self.rows, self.errors = self.rows + rows, self.errors + errors

    def totals(self) -> tuple[int, int]:
        return self.rows, self.errors


def tally(batch: pa.Table, counter) -> pa.Table:
    """A pipeline's last stage: count the batch (its rows with an `error` are errors) and pass it on as it is."""
    errors = int(pc.sum(pc.is_valid(batch["error"])).as_py() or 0) if "error" in batch.column_names else 0
    counter.add.remote(batch.num_rows, errors)
    return batch


class Progress:
    def __init__(self, total: int | None, unit: str = "images", stream: TextIO | None = None,
                 interval: float = 0.5, every: float = 10.0):
        self.total, self.unit = total, unit
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval = interval if self.live else every
        self.counter = Counter.remote()
        self.done = self.errors = 0
        self._stop = threading.Event()

    def update(self) -> None:
        try:
            self.done, self.errors = ray.get(self.counter.totals.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError):  # (the line keeps its last figures)
            pass

    def count(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """`ds`, its rows counted as each block leaves the model stage: a light stage of its own (its resources
        differ from the write's, so Ray Data does not fuse it into the write, which waits for a file's rows)."""
        return ds.map_batches(tally, batch_size=None, batch_format="pyarrow", zero_copy_batch=True, num_cpus=0.05,
                              fn_kwargs={"counter": self.counter})

    def line(self, elapsed: float) -> str:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = []
        if self.total:
            filled = min(BAR, round(BAR * self.done / self.total))
            parts.append(f"[{'#' * filled}{'.' * (BAR - filled)}] {self.done:,}/{self.total:,} {self.unit}")
        else:
            parts.append(f"{self.done:,} {self.unit}")
        parts.append(f"{rate:.1f}/s")
        if self.total and rate > 0 and self.done < self.total:
            left = int((self.total - self.done) / rate)
            parts.append(f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}" if left >= 3600
                         else f"ETA {left // 60}:{left % 60:02d}")
        parts.append(f"{self.errors:,} errors")
        return "  ".join(parts)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval):
            self.update()
            self._show(self.line(time.monotonic() - started))
        self.update()
        self._show(self.line(time.monotonic() - started), last=True)

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
