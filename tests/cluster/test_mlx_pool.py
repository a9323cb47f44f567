"""The MLX node pool on a real two-node Ray cluster started by the test (in a subprocess: this session's
Ray is another cluster), one node carrying the `mlx` resource and the pool label."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pixelray.shapes import caption_correct

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mlx_node_pool_scheduling(tiny_mlx, tiny_llava, tmp_path):
    """In a subprocess (this session's Ray is another cluster): a head without `mlx` and a node with
    it; MLX caption actors and replicas land on the MLX node only, torch ones elsewhere, all finish;
    a cluster without MLX nodes is a clear error; a redeploy switches a served model."""
    script = Path(__file__).with_name("mlx_pool.py")
    result = subprocess.run([sys.executable, str(script), str(tiny_mlx), str(tiny_llava), str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mlx_actor_nodes"] == [report["mlx_node"]]
    assert report["torch_actor_nodes"] and report["mlx_node"] not in report["torch_actor_nodes"]
    assert report["mlx_rows"] == report["torch_rows"] == report["images"] and report["errors"] == 0
    assert report["replica_nodes"] == [report["mlx_node"]] and isinstance(report["served_caption"], str)
    assert "no MLX node" in report["no_pool_error"]
    # the model switched on the running app (Serve redeploy): the bundled model now answers, off the MLX node
    shapes = json.loads((ROOT / "examples/shapes/captions.jsonl").read_text().splitlines()[0])
    assert shapes["image"] == "images/000000.png" and caption_correct(report["switched_caption"], shapes["shapes"])
    assert report["switched_nodes"] and report["mlx_node"] not in report["switched_nodes"]
