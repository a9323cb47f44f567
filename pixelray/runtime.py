"""The Ray runtime every entry point shares: joining a cluster, what code travels with a job, the MLX
node pool's placement rules, and sizing a job's model actor pool."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field

import ray

from pixelray.errors import PixelrayError
from pixelray.logs import ray_log_level, ray_started

logger = logging.getLogger(__name__)

# The MLX node pool: Apple-silicon nodes join with the `mlx` resource and the pool label
#   ray start --address=HEAD:6379 --resources='{"mlx": 1}' --labels='{"pixelray.io/pool": "mlx"}'
# MLX actors and replicas ask for the resource; torch ones select nodes without the label.
MLX_RESOURCE = "mlx"
POOL_LABEL = "pixelray.io/pool"
NOT_MLX = {POOL_LABEL: "!mlx"}
NO_MLX_NODE = ("{what} runs on MLX nodes, and this Ray cluster has no MLX node (no `mlx` resource): join a Mac with "
               """`ray start --address=HEAD:6379 --resources='{{"mlx": 1}}' --labels='{{"pixelray.io/pool": "mlx"}}'`""")
# What a job does not need of a source checkout (besides what .gitignore names, which Ray leaves out too)
CHECKOUT_EXCLUDES = [".git/", "tests/", "benchmarks/", ".ci/", "docs/", "**/__pycache__/"]


def cluster_resources() -> tuple[dict[str, float], int]:
    """(total resources, number of alive nodes) of the connected cluster."""
    return ray.cluster_resources(), sum(1 for n in ray.nodes() if n.get("Alive"))


def code_runtime_env() -> dict:
    """The runtime_env that gives a cluster's workers this driver's code: a source checkout (the
    package with its layers beside it, see pixelray/__init__.py) travels as the working dir, an
    installed pixelray as a py_module."""
    import pixelray

    if len(pixelray.__path__) > 1:
        return {"working_dir": pixelray.__path__[-1], "excludes": CHECKOUT_EXCLUDES}
    return {"py_modules": [pixelray]}


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray instance.

    A driver that joins an existing cluster sends its own code with it (`code_runtime_env`), so the
    workers run what the driver runs; a job submitted to the cluster (`pixelray submit`, a RayJob)
    already has its code there, in its own runtime_env.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    level = ray_log_level()
    if address and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray's job supervisor
        ray.init(address=address, logging_level=level)
    elif address:
        ray.init(address=address, runtime_env=code_runtime_env(), logging_level=level)
    else:  # a local instance: an MLX node of its own when mlx-vlm is installed here
        context = ray.init(resources={MLX_RESOURCE: 1} if importlib.util.find_spec("mlx_vlm") else None,
                           logging_level=level)
        if context.dashboard_url:
            logger.info("Ray dashboard: http://%s", context.dashboard_url.removeprefix("http://"))
    ray_started()


def mlx_units(resources: dict[str, float], what: str) -> float:
    """The `mlx` units among a cluster's resources; none is an error now, not work that waits forever."""
    units = resources.get(MLX_RESOURCE, 0.0)
    if not units:
        raise PixelrayError(NO_MLX_NODE.format(what=what), code="no_mlx_node")
    return units


NETWORK_ACTORS = 2  # actors of a model behind servers, by default (plan_pool)


@dataclass(frozen=True)
class PoolPlan:
    """How many model actors run, and what each one asks the scheduler for."""

    size: int
    num_gpus: float
    num_cpus: float
    torch_threads: int  # 0: leave torch's default (GPU actors)
    resources: dict[str, float] = field(default_factory=dict)  # {"mlx": ...} for MLX actors
    label_selector: dict[str, str] = field(default_factory=lambda: dict(NOT_MLX))  # torch: not on MLX nodes

    def remote_args(self) -> dict:
        args = {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})}
        return {**args, **({"resources": self.resources} if self.resources else {}),
                **({"label_selector": self.label_selector} if self.label_selector else {})}


def plan_pool(num_actors: int | None, device: str, resources: dict[str, float], nodes: int = 1,
              max_useful: int | None = None, cpus_per_actor: float = 0.5, mlx: bool = False,
              gpus_per_actor: int = 1, whole_node: bool = False, network: bool = False) -> PoolPlan:
    """GPUs present (and not forced to cpu): one actor per GPU (per `gpus_per_actor` GPUs, for a model
    split over several by tensor parallelism, which then needs that many). Never more actors than
    `max_useful` (the number of input blocks), since an idle actor still loads a model.

    `mlx` (an MLX model): one actor per unit of the `mlx` resource, on the MLX nodes only.

    CPU only: actors reserve a fraction of a core each, so the decode tasks are never starved (a
    whole core per actor on a 2-core machine deadlocks the reads), and share the node's cores
    between them: up to 8 cores, one single-threaded actor per core (separate processes beat one
    process's intra-op threads on small machines); above that, 4 threads per actor. A model that
    spreads its work over all of a node's cores itself (`whole_node`: vLLM's engine) gets one
    actor per node.

    `network` (a model behind servers: the remote backend): the actors only send requests and wait, so they
    ask for no GPU and a quarter of a core, on any node; NETWORK_ACTORS of them (each with many requests in
    flight), so that one that dies does not stall the job.
    """
    def capped(size: int) -> int:
        return max(1, min(size, max_useful)) if max_useful else size

    if network:
        return PoolPlan(size=capped(num_actors or NETWORK_ACTORS), num_gpus=0.0, num_cpus=0.25, torch_threads=1,
                        label_selector={})
    if mlx:
        units = mlx_units(resources, "an MLX model")
        size = capped(num_actors or max(1, int(units)))
        return PoolPlan(size=size, num_gpus=0.0, num_cpus=cpus_per_actor, torch_threads=0,
                        resources={MLX_RESOURCE: min(1.0, units / size)}, label_selector={})
    gpus = int(resources.get("GPU", 0))
    if gpus_per_actor > 1:
        if gpus < gpus_per_actor or device not in ("auto", "cuda"):
            raise PixelrayError(f"a model split over {gpus_per_actor} GPUs needs that many; the Ray cluster has "
                                f"{gpus}" + ("" if device in ("auto", "cuda") else f" and --device is {device}"),
                                code="no_gpu")
        fit = gpus // gpus_per_actor
        size = capped(min(num_actors or fit, fit))
        return PoolPlan(size=size, num_gpus=float(gpus_per_actor), num_cpus=1.0, torch_threads=0)
    if gpus and device in ("auto", "cuda"):
        size = capped(num_actors or gpus)
        return PoolPlan(size=size, num_gpus=1.0 if size <= gpus else gpus / size, num_cpus=1.0,
                        torch_threads=0)
    if device == "cuda":
        raise PixelrayError("--device cuda was asked for but the Ray cluster has no GPUs", code="no_gpu")
    nodes = max(1, nodes)
    cores = max(1, int(resources.get("CPU", 1)) // nodes)
    per_node = 1 if whole_node else cores if cores <= 8 else cores // 4
    size = capped(num_actors or per_node * nodes)
    threads = max(1, cores // max(1, round(size / nodes)))
    return PoolPlan(size=size, num_gpus=0.0, num_cpus=cpus_per_actor, torch_threads=threads)
