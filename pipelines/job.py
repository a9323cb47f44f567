"""What every batch job does around its own stages: open the store, size the model pool, write, summarise."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa
import ray

from pixelray.errors import TRANSIENT, PixelrayError
from pixelray.pipelines.progress import Progress
from pixelray.pipelines.sink import StoreSink, WriteStats
from pixelray.pipelines.sources import Source, item_ids
from pixelray.runtime import PoolPlan, cluster_resources, init_ray, plan_pool
from pixelray.store import ERRORS, Store, write_parquet_atomic

logger = logging.getLogger(__name__)

WORKER_CRASHED = "worker_crashed"  # the error_type of an item that killed its worker each time it was tried alone


@dataclass
class JobSummary:
    job: str
    verb: str  # "embedded", "captioned", "answered"
    written: int
    errors: int
    previously_stored: int
    seconds: float
    store: Store
    unit: str = "images"
    excluded: int = 0  # items left out by an --exclude table
    samples: list[tuple[str, str]] = field(default_factory=list)  # (file, what was written of it): a few rows
    SAMPLES: ClassVar[int] = 20

    @property
    def images_per_s(self) -> float:
        return (self.written + self.errors) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        lines = [
            f"pixelray {self.job}: {self.written} {self.verb}, {self.errors} errors"
            + (f", {self.previously_stored} already in the store (skipped)" if self.previously_stored else "")
            + (f", {self.excluded} left out by --exclude" if self.excluded else "")
            + f" in {self.seconds:.1f} s ({self.images_per_s:.1f} {self.unit}/s)"
        ]
        for table in (self.store.table, "errors"):
            rows, files = self.store.count(table)
            lines.append(f"  {table + ':':10s}{self.store.uri}/{table}  ({rows} rows in {files} files)")
        for name, text in self.samples:
            lines.append(f"  {name}: {text}")
        if self.samples and self.written > len(self.samples):
            lines.append(f"  ... and {self.written - len(self.samples)} more: pixelray show {self.store.uri} "
                         "--out page.html")
        for path, moved_to in self.store.quarantined:
            lines.append(f"  unreadable, moved aside (its items were done again): {path} -> {moved_to}")
        return "\n".join(lines)


def open_store(out: str, table: str, manifest: dict[str, Any], *, resume: bool, overwrite: bool,
               key: str = "image_id") -> tuple[Store, np.ndarray]:
    """Lock, create or check the store; returns it with the sorted keys it already holds. The job holds
    the store's lock until it ends: use the store as a context manager (`with store:`) around the rest
    of the job, so that it is released however the job ends."""
    store = Store(out, table, key=key)
    store.prepare(manifest, resume=resume, overwrite=overwrite)
    try:
        if resume and (retried := store.forget_errors([TRANSIENT])):
            logger.warning("note: %d items that failed for a passing reason (error_type %s: an LLM server down, "
                           "a timeout, HTTP 429 or 5xx) are tried again", retried, TRANSIENT)
        return store, store.stored_ids()
    except BaseException:
        store.release()
        raise


def start(source: Source, out: str, *, address: str | None, num_actors: int | None, device: str,
          rows_per_block: int, mlx: bool = False, gpus_per_actor: int = 1, whole_node: bool = False,
          network: bool = False) -> PoolPlan:
    """Join or start Ray, then size the model actor pool for this input (see pixelray.runtime.plan_pool)."""
    if source.skipped_files:
        logger.warning("note: ignored %d non-image files", source.skipped_files)
    init_ray(address)
    resources, nodes = cluster_resources()
    if nodes > 1 and "://" not in out:
        logger.warning("note: %d nodes write to %s; it must be shared storage (NFS) on every node, or use a URI "
                       "such as s3://bucket/path", nodes, out)
    blocks = len(source) if source.kind != "files" else -(-len(source) // rows_per_block)
    return plan_pool(num_actors, device, resources, nodes, max_useful=blocks, mlx=mlx, gpus_per_actor=gpus_per_actor,
                     whole_node=whole_node, network=network)


@dataclass(frozen=True)
class Pass:
    """One run of a job's pipeline (see `write`): over every item not in `done`, or `alone`: each item
    in a block and a batch of its own, one block per model actor at a time, so that a crash costs only
    the item that caused it. Its Ray options bound the retries of a block whose worker died."""

    done: np.ndarray  # sorted keys (S32) already in the store: not read
    max_task_retries: int
    alone: bool = False

    def size(self, n: int) -> int:
        """Rows per block, or per batch: `n`, or 1 alone."""
        return 1 if self.alone else n

    def task_args(self) -> dict[str, Any]:
        """map_batches options of a task stage: a task whose worker died is run again this many times."""
        return {"max_retries": self.max_task_retries}

    def actor_args(self, size: int, concurrent_calls: int = 1) -> dict[str, Any]:
        """map_batches options of the model stage: a dead actor is always restarted (it holds no state
        worth losing the job for), the block it was working on is tried `max_task_retries` more times.
        `concurrent_calls` > 1: each actor works on that many batches at once, in threads (a model behind
        servers: the next batch's requests start while the last of the previous one finish)."""
        threads = {"max_concurrent_calls_per_actor": concurrent_calls, "enable_true_multi_threading": True}
        return {"compute": ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1 if self.alone
                                                      else None, **(threads if concurrent_calls > 1 else {})),
                "max_restarts": -1, "max_task_retries": self.max_task_retries}


def write(build: Callable[[Pass], ray.data.Dataset], source: Source, store: Store, done: np.ndarray, *,
          rows_per_file: int, max_task_retries: int, max_crashed_blocks: int, job: str, verb: str,
          unit: str = "images", exclude: set[str] = frozenset()) -> JobSummary:
    """Run the job's pipeline, `build(Pass(...))`, into the store (this is where the work happens) and
    summarise it.

    A block whose worker dies (a segfault, an out-of-memory kill) is tried `max_task_retries` more times,
    then left out, up to `max_crashed_blocks` blocks; one more and the job stops (what was written
    stays, for --resume). With image files as input the items left out are then run again, each alone,
    and one that still kills its worker is an error row (`worker_crashed`): a poison file costs only
    itself, and the job ends. Shards cannot be split so: there the first such block stops the job.

    Images whose image_id is in `exclude` (a `pixelray dedup` table's drops) are skipped like stored ones.
    The run is recorded in the store (runs/*.json: `run_record`)."""
    began, started_at = time.perf_counter(), time.time()
    files = source.kind == "files"
    skip = np.sort(np.array(sorted(exclude), dtype="S32"))
    if files:  # the items (an image, or an image and question) of the excluded images
        images, items = (np.array(ids, dtype="S32") for ids in item_ids(source))
        skip = np.unique(items[np.isin(images, skip)])
    excluded = np.count_nonzero(~np.isin(skip, done)) if files else 0
    total = int(np.count_nonzero(~np.isin(items, np.union1d(done, skip)))) if files else None
    with Progress(total, unit, job=job, store=store.uri) as progress:
        stats = _run(progress.count(build(Pass(np.union1d(done, skip), max_task_retries))), store, rows_per_file,
                     max_task_retries, max_crashed_blocks if files else 0, job)
    if files:
        missing = lambda: ~np.isin(items, np.union1d(store.stored_ids(), skip))  # noqa: E731
        if stats.rows + stats.errors < total:  # blocks left out
            logger.warning("note: %d items were left out with blocks whose worker died; trying each alone",
                           np.count_nonzero(missing()))
            alone = _run(build(Pass(np.union1d(store.stored_ids(), skip), max_task_retries, alone=True)), store,
                         rows_per_file, max_task_retries, -1, job)
            stats.rows, stats.errors = stats.rows + alone.rows, stats.errors + alone.errors
            for kind, n in alone.error_types.items():
                stats.error_types[kind] = stats.error_types.get(kind, 0) + n
            crashed = np.flatnonzero(missing())
            if len(crashed):
                _record_crashes(source, crashed, store, max_task_retries + 1)
                stats.errors += len(crashed)
                stats.error_types[WORKER_CRASHED] = len(crashed)
    summary = JobSummary(job=job, verb=verb, written=stats.rows, errors=stats.errors,
                         previously_stored=len(done), seconds=time.perf_counter() - began, store=store, unit=unit,
                         excluded=excluded)
    store.write_run_record(run_record(summary, started_at, stats.error_types, store.read_manifest()))
    return summary


def run_record(summary: JobSummary, started_at: float, error_types: dict[str, int], settings: dict) -> dict:
    """What a run did, as the store keeps it: when, how long, how many, how fast, errors by type, settings."""
    stamp = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))  # noqa: E731
    return {"job": summary.job, "started": stamp(started_at), "ended": stamp(started_at + summary.seconds),
            "seconds": round(summary.seconds, 3), "unit": summary.unit, "written": int(summary.written),
            "errors": int(summary.errors), "errors_by_type": {k: int(n) for k, n in sorted(error_types.items())},
            "previously_stored": int(summary.previously_stored), "excluded": int(summary.excluded),
            "items_per_s": round(summary.images_per_s, 3), "settings": settings}


def _run(ds: ray.data.Dataset, store: Store, rows_per_file: int, max_task_retries: int, max_errored_blocks: int,
         job: str) -> WriteStats:
    """One pass into the store, leaving out at most `max_errored_blocks` failed blocks (-1: any number)."""
    sink = StoreSink(store, rows_per_file)  # (a sink per pass: its file names must not repeat an earlier pass's)
    ds.context.max_errored_blocks = max_errored_blocks  # this dataset's own copy of Ray Data's settings
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.1, "max_retries": max_task_retries})
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as e:
        where = f"more than {max_errored_blocks} blocks" if max_errored_blocks else "a block of a shard"
        raise PixelrayError(
            f"{job}: workers died (a crash, or killed for memory) on {where}, each tried {max_task_retries + 1} "
            f"times; stopped. What was written is kept: --resume goes on from it. Last: {str(e).splitlines()[0]}",
            status=500, code="workers_died") from None
    return sink.stats


def _record_crashes(source: Source, indices: np.ndarray, store: Store, tries: int) -> None:
    """Error rows for the items (indices into `source`) that killed their worker each time they ran alone."""
    images, items = item_ids(source)
    columns = {store.key: [items[i] for i in indices], "image_id": [images[i] for i in indices],
               "path": [source.uris[i] for i in indices]}
    if source.questions is not None:
        columns["question"] = [source.questions[i] for i in indices]
    message = (f"processing it alone failed (up to {tries} times when its worker died): its worker crashed, was "
               "killed for memory, or raised (the Ray logs say which)")
    table = pa.table({**columns, "error_type": [WORKER_CRASHED] * len(indices), "error": [message] * len(indices)},
                     schema=pa.schema([(name, pa.string()) for name in (*columns, "error_type", "error")]))
    name = f"{ERRORS}/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}-crashed.parquet"
    write_parquet_atomic(table, store.fs, f"{store.root}/{name}")
    logger.warning("note: %d items killed their worker each time, alone: recorded in %s/%s (error_type %s)",
                   len(indices), store.uri, name, WORKER_CRASHED)
