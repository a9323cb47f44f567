"""Clusters: `pixelray submit` and `pixelray jobs` against a real two-node Ray cluster started here
(`ray start --head` with the dashboard on 127.0.0.1, plus a worker node; pixelray.testing.cluster), and
the cluster definitions checked against what their consumers accept: KubeRay's CRD fields, Ray's
cluster-launcher schema, `serve build`'s output, Ray's runtime_env validation."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

from pixelray.cli import build_parser
from pixelray.cluster.submit import PROJECT, job_command, runtime_env, split_submit_options
from pixelray.errors import PixelrayError
from pixelray.shapes import caption_correct, train_tokenizer, write_dataset
from pixelray.testing.cluster import LocalCluster

EXAMPLES = PROJECT / "examples" / "shapes"
KUBERAY = PROJECT / "cluster" / "kuberay"
CRD_FIELDS = json.loads((Path(__file__).parent / "data" / "kuberay-v1-crd-fields.json").read_text())


def pixelray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pixelray.cli", *args], cwd=PROJECT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(worker_cpus=2).start()
    yield c
    c.stop()
    assert c.processes() == [], "the cluster's processes outlived it"


def submit(cluster: LocalCluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # --no-pip: the cluster runs from this project's .venv, which has every package (and Ray would clone
    # a whole virtualenv to install a pip runtime_env into it)
    return pixelray("submit", *args, "--no-pip", "--address", cluster.address, timeout=timeout)


def submitted_id(proc: subprocess.CompletedProcess) -> str:
    return re.search(r"submitted (pixelray-\S+):", proc.stdout).group(1)


def job_status(cluster: LocalCluster, job_id: str) -> str:
    listing = pixelray("jobs", "list", "--address", cluster.address, timeout=60)
    assert listing.returncode == 0, listing.stderr
    return re.search(rf"^{re.escape(job_id)}\s+(\w+)", listing.stdout, re.M).group(1)


def features_by_name(store: Path) -> dict[str, np.ndarray]:
    rows = pq.read_table(store / "features").to_pylist()
    return {Path(r["path"]).name: np.array(r["embedding"], dtype=np.float32) for r in rows}


@pytest.mark.slow
def test_submitted_embed_job_writes_what_a_local_run_writes(cluster, ray_address, tiny_clip, tmp_path):
    local = pixelray("embed", "examples/shapes", "--out", str(tmp_path / "local"), "--encoder", str(tiny_clip),
                     "--address", ray_address)
    assert local.returncode == 0, local.stderr[-3000:]

    # the README's command: a path inside the project ships with the job; the output is absolute
    proc = submit(cluster, "embed", "examples/shapes", "--out", str(tmp_path / "remote"), "--encoder", str(tiny_clip))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = submitted_id(proc)
    # the job's own output came back through the followed logs, and it ran in the uploaded copy
    assert "8 images embedded, 0 errors" in proc.stdout and f"{job_id}: SUCCEEDED" in proc.stdout
    remote_paths = pq.read_table(tmp_path / "remote" / "features")["path"].to_pylist()
    assert all("working_dir_files" in p for p in remote_paths)

    ours, theirs = features_by_name(tmp_path / "local"), features_by_name(tmp_path / "remote")
    assert sorted(ours) == sorted(p.name for p in (EXAMPLES / "images").glob("*.png")) == sorted(theirs)
    for name in ours:
        np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-5, atol=1e-6)
    assert job_status(cluster, job_id) == "SUCCEEDED"


@pytest.mark.slow
def test_no_wait_then_follow_a_caption_job(cluster, tmp_path):
    proc = submit(cluster, "caption", "examples/shapes", "--out", str(tmp_path / "caps"), "--no-wait", timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = submitted_id(proc)
    assert "SUCCEEDED" not in proc.stdout  # it returned without waiting

    follow = pixelray("jobs", "logs", job_id, "--follow", "--address", cluster.address)
    assert follow.returncode == 0, follow.stdout[-3000:]
    assert "8 images captioned, 0 errors" in follow.stdout and f"{job_id}: SUCCEEDED" in follow.stdout
    # the bundled shapes-demo model is trained: its captions are checked, not just counted
    refs = {Path(json.loads(line)["image"]).name: json.loads(line) for line in (EXAMPLES / "captions.jsonl").open()}
    rows = pq.read_table(tmp_path / "caps" / "captions").to_pylist()
    assert len(rows) == 8
    for row in rows:
        ref = refs[Path(row["path"]).name]
        assert caption_correct(row["caption"], ref["shapes"]), (row["caption"], ref["captions"])
    logs = pixelray("jobs", "logs", job_id, "--address", cluster.address, timeout=60)
    assert logs.returncode == 0 and "8 images captioned, 0 errors" in logs.stdout


@pytest.mark.slow
def test_a_failing_job_returns_its_status_and_logs(cluster, tmp_path):
    proc = submit(cluster, "caption", "examples/shapes", "--out", str(tmp_path / "caps"), "--model", "no-such-model")
    assert proc.returncode == 2, proc.stdout[-3000:]  # the job's own exit code (pixelray's usage errors: 2)
    job_id = submitted_id(proc)
    assert "no-such-model" in proc.stdout and f"{job_id}: FAILED" in proc.stdout
    logs = pixelray("jobs", "logs", job_id, "--address", cluster.address, timeout=60)
    assert logs.returncode == 0 and "pixelray caption: error:" in logs.stdout and "no-such-model" in logs.stdout
    assert job_status(cluster, job_id) == "FAILED"
    unknown = pixelray("jobs", "logs", "pixelray-no-such-job", "--address", cluster.address, timeout=60)
    assert unknown.returncode == 2 and "pixelray jobs: error:" in unknown.stderr and "does not exist" in unknown.stderr


@pytest.mark.slow
def test_train_job_and_stopping_one(cluster, tmp_path):
    data = write_dataset(tmp_path / "data", 24, seed=2, conversations_per_image=2)
    train_tokenizer(data / "tokenizer")
    common = ["--config", "train_jobs/configs/debug.yaml", f"model.tokenizer={data / 'tokenizer'}",
              f"data.train={data / 'llava.json'}", "scaling.num_workers=1"]
    proc = submit(cluster, "train", *common, f"output_dir={tmp_path / 'train'}", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert list(summary["stages"]) == ["stage1", "stage2"] and summary["stages"]["stage2"]["steps"] == 4
    assert (tmp_path / "train" / "stage2" / "model" / "config.json").exists()

    # a long run: Ctrl-C stops following it, not the job; `pixelray jobs stop` stops it
    follower = subprocess.Popen(
        [sys.executable, "-m", "pixelray.cli", "submit", "train", *common, f"output_dir={tmp_path / 'long'}",
         "stages.1.max_steps=100000", "--no-pip", "--address", cluster.address],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as in a terminal: a shell's background jobs (CI's, say) start with SIGINT ignored, and Python keeps that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        job_id = re.search(r"submitted (pixelray-\S+):", follower.stdout.readline()).group(1)
        deadline = time.monotonic() + 120
        while job_status(cluster, job_id) != "RUNNING" and time.monotonic() < deadline:
            time.sleep(1)
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 130 and f"{job_id} goes on" in err, err[-2000:]
    assert job_status(cluster, job_id) == "RUNNING"
    stop = pixelray("jobs", "stop", job_id, "--address", cluster.address, timeout=120)
    assert stop.returncode == 0 and f"{job_id}: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert job_status(cluster, job_id) == "STOPPED"


def command(job: str, argv: list[str], cwd: Path = PROJECT) -> list[str]:
    """What `pixelray submit JOB argv...` would run on the cluster, checked as the CLI checks it."""
    return job_command(job, argv, build_parser().parse_args([job, *argv]), cwd)


def test_submit_checks_the_command_before_uploading(tmp_path):
    assert command("embed", ["examples/shapes", "--out", "s3://b/f"]) == [
        "python", "-m", "pixelray.cli", "embed", "examples/shapes", "--out", "s3://b/f"]
    # run from a sub-folder: the path is made relative to the project root, where the job runs
    assert command("caption", ["shapes", "--out=/shared/c"], cwd=PROJECT / "examples")[4:] == [
        "examples/shapes", "--out=/shared/c"]
    errors = {  # message: (job, argv, where it is run from)
        "would be written inside the job's temporary copy": ("embed", ["examples/shapes", "--out", "runs/x"], PROJECT),
        "does not exist here": ("embed", ["no/such/dir", "--out", "/shared/x"], PROJECT),
        "is outside the project": ("caption", [".", "--out", "/x"], tmp_path),
        "output_dir": ("train", ["--config", "train_jobs/configs/debug.yaml"], PROJECT),
    }
    for message, (job, argv, cwd) in errors.items():
        with pytest.raises(PixelrayError, match=message):
            command(job, argv, cwd=cwd)
    # train output must be a path every node mounts: Ray Train checkpoints there
    with pytest.raises(PixelrayError, match="absolute path"):
        command("train", ["--config", "train_jobs/configs/debug.yaml", "output_dir=s3://b/t"])
    with pytest.raises(SystemExit):  # a bad option of the job itself: the command line's error, before any upload
        command("embed", ["examples/shapes", "--out", "/x", "--no-such-option"])
    assert split_submit_options(["x", "--address=http://h:8265", "--no-wait", "--out", "/o", "--runtime-env", "e"]) == (
        {"address": "http://h:8265", "no_wait": True, "runtime_env": "e"}, ["x", "--out", "/o"])
    bad = pixelray("submit", "embed", "examples/shapes", "--out", "rel", "--address", "http://127.0.0.1:9", timeout=60)
    assert bad.returncode == 2 and "pixelray submit: error: --out 'rel'" in bad.stderr
    nobody = pixelray("jobs", "list", "--address", "http://127.0.0.1:9", timeout=60)
    assert nobody.returncode == 2 and "Failed to connect to Ray at address: http://127.0.0.1:9" in nobody.stderr


def test_runtime_env_ships_the_project_and_its_requirements():
    from ray.runtime_env import RuntimeEnv

    env = runtime_env()
    assert env["working_dir"] == str(PROJECT) and {".git/", "tests/"} <= set(env["excludes"])  # code, no history
    parsed = RuntimeEnv(**env)  # Ray's own validation; it reads the requirements file here, on the client
    lines = [p for p in parsed["pip"]["packages"] if p.strip() and not p.startswith("#")]  # pip skips comments
    packages = [Requirement(p).name for p in lines]
    assert "torch" in packages and "transformers" in packages and "ray" not in packages
    assert "pip" not in runtime_env(pip=False)

    # cluster/requirements.txt: the same packages as pyproject's dependencies and serve/train/hf extras, and vLLM
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in ("serve", "train", "hf")
                                          for r in project["optional-dependencies"][extra])]
    names = {Requirement(r).name for r in wanted} - {"ray"}
    assert names <= set(packages), names - set(packages)
    pins = [line for line in (PROJECT / "requirements-vllm-gpu.txt").read_text().splitlines()  # GPU nodes' pins
            if line and not line.startswith("#")]
    assert set(pins) <= set(lines)


def check_fields(node, level: dict, where: str) -> None:
    """Keys, required keys, types and enums of one level of a KubeRay resource, as its CRD has them."""
    assert isinstance(node, dict), where
    unknown = set(node) - set(level["properties"])
    assert not unknown, f"{where}: {sorted(unknown)} are not fields of the CRD"
    missing = set(level.get("required", ())) - set(node)
    assert not missing, f"{where}: {sorted(missing)} are required"
    for key, value in node.items():
        kind = level["types"][key]
        expect = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "object": dict,
                  "array": list}[kind.split()[0]]
        assert isinstance(value, expect) and not (expect is int and isinstance(value, bool)), f"{where}.{key}: {kind}"
        if "additionalProperties string" in kind:
            assert all(isinstance(v, str) for v in value.values()), f"{where}.{key}: values must be strings"
        if key in level.get("enums", {}):
            assert value in level["enums"][key], f"{where}.{key}: {value!r} not in {level['enums'][key]}"


def check_cluster_spec(spec: dict, levels: dict, prefix: str) -> None:
    check_fields(spec, levels[prefix], prefix)
    check_fields(spec["headGroupSpec"], levels[f"{prefix}.headGroupSpec"], f"{prefix}.headGroupSpec")
    for group in spec.get("workerGroupSpecs", []):
        check_fields(group, levels[f"{prefix}.workerGroupSpecs[]"], f"{prefix}.workerGroupSpecs[]")
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    if "autoscalerOptions" in spec:
        check_fields(spec["autoscalerOptions"], levels[f"{prefix}.autoscalerOptions"], f"{prefix}.autoscalerOptions")
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["image"] and c["name"] for c in containers)
        assert spec.get("rayVersion", "2.60.0") == "2.60.0"  # the Ray the project pins and tests


def test_kuberay_manifests_have_the_fields_kuberay_expects():
    seen = set()
    for path in sorted(KUBERAY.glob("*.yaml")):
        assert path.read_text().startswith("#") and "Run as:" in path.read_text(), path.name
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["apiVersion"] != CRD_FIELDS["apiVersion"]:
                assert doc["kind"] == "PersistentVolumeClaim" and doc["apiVersion"] == "v1"
                continue
            kind, levels, spec = doc["kind"], CRD_FIELDS[doc["kind"]], doc["spec"]
            seen.add(kind)
            assert doc["metadata"]["name"]
            if kind == "RayCluster":
                check_cluster_spec(spec, levels, "spec")
            elif kind == "RayJob":
                check_fields(spec, levels["spec"], f"{path.name}: spec")
                assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "one of the two, as KubeRay wants"
                if "rayClusterSpec" in spec:
                    check_cluster_spec(spec["rayClusterSpec"], levels, "spec.rayClusterSpec")
                assert spec["entrypoint"].startswith("pixelray ")
                job = spec["entrypoint"].split()[1]
                from pixelray.cli import build_parser  # the entrypoint parses as the pixelray command it is

                build_parser().parse_args(spec["entrypoint"].split()[1:])
                assert job in ("embed", "caption", "train")
                yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
            else:
                check_fields(spec, levels["spec"], f"{path.name}: spec")
                check_cluster_spec(spec["rayClusterConfig"], levels, "spec.rayClusterConfig")
    assert seen == {"RayCluster", "RayJob", "RayService"}


def test_rayservice_serve_config_is_serve_build_output(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "built.yaml"
    built = subprocess.run([str(Path(sys.executable).parent / "serve"), "build", "pixelray.serve_apps.cluster_app:app",
                            "-o", str(out)], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-3000:]
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    ours, theirs = yaml.safe_load(service["spec"]["serveConfigV2"]), yaml.safe_load(out.read_text())
    for app in theirs["applications"]:
        app["name"] = "vlm"  # serve build names apps app1, app2, ...; the manifest names it
    assert ours == theirs
    ServeDeploySchema.model_validate(ours)  # and it is a Serve config that `serve deploy` takes
    # every model of serve_apps/configs/cluster.yaml has its deployment
    models = yaml.safe_load((PROJECT / "serve_apps" / "configs" / "cluster.yaml").read_text())["applications"][0]
    names = {d["name"] for d in ours["applications"][0]["deployments"]}
    assert names == {"Ingress", *(f"model-{m['name']}" for m in models["args"]["models"])}


def test_ray_up_config_passes_the_cluster_launchers_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((PROJECT / "cluster" / "ray-up.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    config["available_node_types"]["gpu"]["max_wrokers"] = 4  # a typo is caught
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(config))
