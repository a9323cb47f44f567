"""Connecting a batch job to Ray and sizing its actor pools."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

import pipelines
import pixelray


def cluster_resources() -> tuple[dict[str, float], int]:
    """(total resources, number of alive nodes) of the connected cluster."""
    return ray.cluster_resources(), sum(1 for n in ray.nodes() if n.get("Alive"))


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray instance.

    When joining an existing cluster the project's own packages travel with the job
    (runtime_env py_modules), so workers run the same code as the driver.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        import train_jobs

        ray.init(address=address, runtime_env={"py_modules": [pixelray, pipelines, train_jobs]})
    else:
        ray.init()


@dataclass(frozen=True)
class PoolPlan:
    """How many model actors run, and what each one asks the scheduler for."""

    size: int
    num_gpus: float
    num_cpus: float
    torch_threads: int  # 0: leave torch's default (GPU actors)

    def remote_args(self) -> dict[str, float]:
        return {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus} if self.num_gpus else {
            "num_cpus": self.num_cpus}


def plan_pool(num_actors: int | None, device: str, resources: dict[str, float], nodes: int = 1,
              max_useful: int | None = None, cpus_per_actor: float = 0.5) -> PoolPlan:
    """GPUs present (and not forced to cpu): one actor per GPU. Never more actors than
    `max_useful` (the number of input blocks), since an idle actor still loads a model.

    CPU only: actors reserve a fraction of a core each, so the decode tasks are never starved
    (a whole core per actor on a 2-core machine deadlocks the reads), and share the node's
    cores between them: up to 8 cores, one single-threaded actor per core (separate processes
    beat one process's intra-op threads on small machines); above that, 4 threads per actor.
    """
    def capped(size: int) -> int:
        return max(1, min(size, max_useful)) if max_useful else size

    gpus = int(resources.get("GPU", 0))
    if gpus and device in ("auto", "cuda"):
        size = capped(num_actors or gpus)
        return PoolPlan(size=size, num_gpus=1.0 if size <= gpus else gpus / size, num_cpus=1.0,
                        torch_threads=0)
    if device == "cuda":
        raise RuntimeError("--device cuda was asked for but the Ray cluster has no GPUs")
    nodes = max(1, nodes)
    cores = max(1, int(resources.get("CPU", 1)) // nodes)
    per_node = cores if cores <= 8 else cores // 4
    size = capped(num_actors or per_node * nodes)
    threads = max(1, cores // max(1, round(size / nodes)))
    return PoolPlan(size=size, num_gpus=0.0, num_cpus=cpus_per_actor, torch_threads=threads)
