"""The MLX node pool on a real two-node Ray cluster, run by tests/test_mlx.py in its own process (the
test session's Ray is another cluster). Prints one JSON line: where each kind of work ran.

    python tests/cluster/mlx_pool.py MLX_MODEL_DIR TORCH_MODEL_DIR WORK_DIR
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pyarrow.parquet as pq
import ray
import requests
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from pixelray.errors import PixelrayError
from pixelray.pipelines.caption import CaptionConfig, run_caption
from pixelray.serve_apps.vlm import build_app

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "images"
CAPTION_ACTOR = "MapWorker(MapBatches(CaptionActor))"


def actors(class_name: str) -> dict[str, str]:
    """actor id -> node id, for every actor of the class this cluster has had."""
    return {a.actor_id: a.node_id for a in list_actors(filters=[("class_name", "=", class_name)], detail=True,
                                                       limit=10_000, raise_on_missing_output=False)}


def caption(model: str, out: Path) -> tuple[int, int, list[str]]:
    """Caption the example images; (rows, errors, the nodes its new caption actors ran on)."""
    before = actors(CAPTION_ACTOR)
    result = run_caption(CaptionConfig(input=str(IMAGES), out=str(out), model=model, generation={"max_new_tokens": 4},
                                       batch_size=4))
    nodes = sorted({n for a, n in actors(CAPTION_ACTOR).items() if a not in before})
    return pq.read_table(out / "captions").num_rows, result.errors, nodes


def main(mlx_model: str, torch_model: str, work: Path) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        ray.init(address=cluster.address)
        return run(cluster, mlx_model, torch_model, work)
    finally:  # (Cluster.shutdown also removes the "current cluster" file a later ray.init() would join)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def run(cluster: Cluster, mlx_model: str, torch_model: str, work: Path) -> dict:
    report: dict = {"images": len(list(IMAGES.glob("*.png")))}
    try:
        run_caption(CaptionConfig(input=str(IMAGES), out=str(work / "none"), model=f"mlx:{mlx_model}"))
    except PixelrayError as e:  # before any MLX node joined: an error, at once
        report["no_pool_error"] = str(e)
    # an MLX node, as a Mac joins: the `mlx` resource and the pool label
    node = cluster.add_node(num_cpus=2, resources={"mlx": 1}, labels={"pixelray.io/pool": "mlx"})
    cluster.wait_for_nodes()
    report["mlx_node"] = node.node_id
    report["mlx_rows"], mlx_errors, report["mlx_actor_nodes"] = caption(f"mlx:{mlx_model}", work / "mlx")
    report["torch_rows"], torch_errors, report["torch_actor_nodes"] = caption(torch_model, work / "torch")
    report["errors"] = mlx_errors + torch_errors

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [{"name": "tiny-mlx", "source": f"mlx:{mlx_model}", "num_cpus": 0.1,
                                     "max_new_tokens": 8}]}), name="mlx", route_prefix="/")
    reply = requests.post(f"http://127.0.0.1:{port}/caption", files={"image": (IMAGES / "000000.png").open("rb")},
                          data={"max_new_tokens": 4}, timeout=120)
    reply.raise_for_status()
    report["served_caption"] = reply.json()["caption"]
    replicas = actors("ServeReplica:mlx:model-tiny-mlx")
    report["replica_nodes"] = sorted(set(replicas.values()))
    # switching the model of the running app: Serve's own redeploy with the changed config (the bundled
    # torch model under the same name); the new replica lands off the MLX node
    serve.run(build_app({"models": [{"name": "tiny-mlx", "source": "shapes-demo", "num_cpus": 0.1,
                                     "max_new_tokens": 32}]}), name="mlx", route_prefix="/")
    reply = requests.post(f"http://127.0.0.1:{port}/caption", files={"image": (IMAGES / "000000.png").open("rb")},
                          data={"max_new_tokens": 32}, timeout=120)
    reply.raise_for_status()
    report["switched_caption"] = reply.json()["caption"]
    report["switched_nodes"] = sorted({n for a, n in actors("ServeReplica:mlx:model-tiny-mlx").items()
                                       if a not in replicas})
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
