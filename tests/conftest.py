"""Shared fixtures: one Ray instance per test session, tiny models (built by pixelray.testing), paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may come from a model hub in tests; local Ray needs no token auth.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # ray.train.report in ~0.1 s, not ~2 s

from pixelray.testing.tiny_encoders import save_tiny_dinov2, save_tiny_open_clip  # noqa: E402
from pixelray.testing.tiny_vlms import (save_tiny_llava, save_tiny_paligemma, save_tiny_pixelray,  # noqa: E402
                                        save_tiny_qwen2_vl, save_tiny_smolvlm, save_tiny_text_llm)

VLM_BUILDERS = {"llava": save_tiny_llava, "qwen2_vl": save_tiny_qwen2_vl, "smolvlm": save_tiny_smolvlm,
                "paligemma": save_tiny_paligemma, "pixelray": save_tiny_pixelray}


@pytest.fixture(scope="session")
def ray_address():
    """Start Ray once for the whole session; yields the address other drivers can join."""
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_address):
    """Ray Serve (its controller and HTTP proxy) on a free port of 127.0.0.1, started once for the session: each
    module runs its apps on it and deletes them when it is done."""
    from ray import serve

    from pixelray.testing import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2"))


@pytest.fixture(scope="session")
def tiny_dinov2_registers(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2-reg"), registers=2)


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> folder of a tiny random VLM (LLaVA, Qwen2-VL, SmolVLM, PaliGemma, pixelray's own)."""
    return {family: build(tmp_path_factory.mktemp(f"tiny-{family}")) for family, build in VLM_BUILDERS.items()}


@pytest.fixture(scope="session")
def tiny_llava(tiny_vlm_dirs) -> Path:
    return tiny_vlm_dirs["llava"]


@pytest.fixture(scope="session")
def tiny_qwen2_vl_h128(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL with heads of 64: the smallest vLLM's CPU attention runs."""
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl-h128"), hidden=128)


@pytest.fixture(scope="session")
def tiny_text_llm(tmp_path_factory) -> Path:
    return save_tiny_text_llm(tmp_path_factory.mktemp("tiny-text-llm"))


@pytest.fixture(scope="session")
def tiny_mlx(tmp_path_factory) -> Path:
    """A tiny mlx-vlm Qwen2-VL, built in a process of its own (mlx_vlm changes transformers' classes)."""
    from pixelray.testing.tiny_mlx import save_in_subprocess

    return save_in_subprocess(tmp_path_factory.mktemp("tiny-mlx"))
