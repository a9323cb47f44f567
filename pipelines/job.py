"""What every batch job does around its own stages: open the store, size the model pool, write, summarise."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from pixelray.pipelines.sources import Source
from pixelray.pipelines.store import Store
from pixelray.runtime import PoolPlan, cluster_resources, init_ray, plan_pool

logger = logging.getLogger(__name__)


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

    @property
    def images_per_s(self) -> float:
        return (self.written + self.errors) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        lines = [
            f"pixelray {self.job}: {self.written} {self.verb}, {self.errors} errors"
            + (f", {self.previously_stored} already in the store (skipped)" if self.previously_stored else "")
            + f" in {self.seconds:.1f} s ({self.images_per_s:.1f} {self.unit}/s)"
        ]
        for table in (self.store.table, "errors"):
            rows, files = self.store.count(table)
            lines.append(f"  {table + ':':10s}{self.store.uri}/{table}  ({rows} rows in {files} files)")
        return "\n".join(lines)


def open_store(out: str, table: str, manifest: dict[str, Any], *, resume: bool, overwrite: bool,
               key: str = "image_id") -> tuple[Store, np.ndarray]:
    """Create or check the store; returns it with the sorted keys it already holds."""
    store = Store(out, table, key=key)
    store.prepare(manifest, resume=resume, overwrite=overwrite)
    return store, store.stored_ids()


def start(source: Source, out: str, *, address: str | None, num_actors: int | None, device: str,
          rows_per_block: int, mlx: bool = False, gpus_per_actor: int = 1, whole_node: bool = False) -> PoolPlan:
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
                     whole_node=whole_node)


def write(ds: ray.data.Dataset, store: Store, rows_per_file: int, *, job: str, verb: str,
          previously_stored: int, unit: str = "images") -> JobSummary:
    """Run the pipeline into the store (this is where the work happens) and summarise it."""
    sink = store.sink(rows_per_file)
    began = time.perf_counter()
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.1})
    return JobSummary(job=job, verb=verb, written=sink.stats.rows, errors=sink.stats.errors,
                      previously_stored=previously_stored, seconds=time.perf_counter() - began, store=store,
                      unit=unit)
