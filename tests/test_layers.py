"""The structure: what `pip install` puts in site-packages (one `pixelray` package, the layers inside it,
their data files), and the import contract of pyproject.toml checked on that package by import-linter
(library <- jobs and apps <- cluster tooling <- command line), with a back edge shown to break it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"pipelines": "pixelray/pipelines", "serve_apps": "pixelray/serve_apps", "train_jobs": "pixelray/train_jobs",
          "cluster": "pixelray/cluster", "pixelray": "pixelray"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project's wheel, built as pip builds it (from a copy: setuptools writes build/ beside the
    sources), unpacked as pip installs it."""
    out = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(ROOT, out / "source", ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    site = out / "site-packages"
    with zipfile.ZipFile(next(out.glob("pixelray-*.whl"))) as wheel:
        wheel.extractall(site)
    return site


def lint_imports(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), str(ROOT / "pyproject.toml")],
                          cwd=site, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)


def test_one_top_level_package_with_every_layer_and_its_data(installed):
    assert {p.name for p in installed.iterdir()} == {"pixelray", "pixelray-0.1.0.dist-info"}
    for folder, inside in LAYERS.items():  # every package of the checkout, at its place inside pixelray
        for init in (ROOT / folder).rglob("__init__.py"):
            assert (installed / inside / init.relative_to(ROOT / folder)).is_file(), init
    for data in ("pixelray/models/shapes-demo/model.safetensors", "pixelray/serve_apps/configs/cluster.yaml",
                 "pixelray/train_jobs/configs/shapes.yaml", "pixelray/train_jobs/deepspeed/zero2.json",
                 "pixelray/cluster/runtime_env.yaml", "pixelray/cluster/requirements.txt",
                 "pixelray/cluster/kuberay/rayservice.yaml"):
        assert (installed / data).is_file(), data


def test_the_import_contract_holds(installed):
    result = lint_imports(installed)
    assert result.returncode == 0 and "1 kept, 0 broken" in result.stdout, result.stdout[-3000:] + result.stderr


def test_a_back_edge_breaks_the_contract(installed, tmp_path):
    """The check can fail: the library importing a job is reported, by module and line."""
    site = tmp_path / "site-packages"
    shutil.copytree(installed, site)
    images = site / "pixelray" / "images.py"
    images.write_text(images.read_text() + "\n\ndef _back_edge():\n    import pixelray.pipelines.job  # noqa\n")
    result = lint_imports(site)
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout[-3000:]
    assert "pixelray.images -> pixelray.pipelines.job" in result.stdout


def test_a_checkout_maps_the_layers_as_the_wheel_does():
    """In a source checkout (this one, an editable install, a job's working dir) pixelray.pipelines is
    pipelines/, as the wheel has it inside the package."""
    import pixelray
    import pixelray.pipelines

    assert Path(pixelray.pipelines.__file__).resolve() == ROOT / "pipelines" / "__init__.py"
    assert pixelray.__path__[-1] == str(ROOT)
