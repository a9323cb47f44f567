"""The Ray runtime every entry point shares: sizing a model actor pool for GPUs, CPUs and the MLX pool."""

import pytest

from pixelray.errors import PixelrayError
from pixelray.runtime import plan_pool


def test_pool_plan_requests_gpus_when_present():
    gpu = plan_pool(None, "auto", {"CPU": 32, "GPU": 4}, nodes=2)
    assert (gpu.size, gpu.num_gpus, gpu.remote_args()["num_gpus"]) == (4, 1.0, 1.0)
    shared = plan_pool(8, "auto", {"CPU": 32, "GPU": 4}, nodes=2)
    assert shared.num_gpus == 0.5
    cpu = plan_pool(None, "auto", {"CPU": 2}, nodes=1)
    assert (cpu.size, cpu.num_cpus, cpu.torch_threads) == (2, 0.5, 1)
    assert "num_gpus" not in cpu.remote_args()
    assert plan_pool(1, "auto", {"CPU": 2}).torch_threads == 2
    assert (plan_pool(None, "auto", {"CPU": 2}, max_useful=1).size, plan_pool(None, "auto", {"CPU": 2},
            max_useful=1).torch_threads) == (1, 2)  # one block of input: one actor, all cores
    assert plan_pool(None, "auto", {"CPU": 8, "GPU": 4}, max_useful=3).size == 3
    big = plan_pool(None, "cpu", {"CPU": 64}, nodes=2)
    assert (big.size, big.torch_threads) == (16, 4)
    assert plan_pool(None, "cpu", {"CPU": 8, "GPU": 1}).num_gpus == 0
    with pytest.raises(PixelrayError, match="no GPUs"):
        plan_pool(None, "cuda", {"CPU": 2})
    # a model split over several GPUs (vLLM's tensor parallelism): each actor reserves that many
    split = plan_pool(None, "auto", {"CPU": 32, "GPU": 8}, nodes=2, gpus_per_actor=2)
    assert (split.size, split.remote_args()["num_gpus"]) == (4, 2.0)
    assert plan_pool(9, "auto", {"CPU": 32, "GPU": 8}, gpus_per_actor=4).size == 2  # never more than fit
    # vLLM's engine on CPU-only nodes uses all their cores: one actor per node, with every core's thread
    engine = plan_pool(None, "auto", {"CPU": 16}, nodes=2, whole_node=True)
    assert (engine.size, engine.torch_threads) == (2, 8)
    assert plan_pool(None, "auto", {"CPU": 16, "GPU": 4}, nodes=2, whole_node=True).size == 4  # one per GPU
    with pytest.raises(PixelrayError, match="split over 4 GPUs needs that many; the Ray cluster has 2"):
        plan_pool(None, "auto", {"CPU": 8, "GPU": 2}, gpus_per_actor=4)
    # torch actors stay off the MLX node pool; MLX actors go only there, one per `mlx` unit
    assert cpu.remote_args()["label_selector"] == {"pixelray.io/pool": "!mlx"}
    mlx = plan_pool(None, "auto", {"CPU": 16, "GPU": 2, "mlx": 2}, nodes=3, mlx=True)
    assert (mlx.size, mlx.num_gpus, mlx.remote_args()["resources"]) == (2, 0.0, {"mlx": 1.0})
    assert "label_selector" not in mlx.remote_args() and "num_gpus" not in mlx.remote_args()
    assert plan_pool(4, "auto", {"CPU": 8, "mlx": 2}, mlx=True).resources == {"mlx": 0.5}
    with pytest.raises(PixelrayError, match="no MLX node"):
        plan_pool(None, "auto", {"CPU": 8, "GPU": 1}, mlx=True)
