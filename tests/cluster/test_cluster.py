"""Clusters: `pixelray submit` and `pixelray jobs` against a real two-node Ray cluster started here
(`ray start --head` with the dashboard on 127.0.0.1, plus a worker node; pixelray.testing.cluster), and
the cluster definitions checked against what their consumers accept: KubeRay's CRD fields, Ray's
cluster-launcher schema, `serve build`'s output, Ray's runtime_env validation."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

from pixelray.cli import build_parser
from pixelray.cluster.submit import PROJECT, job_command, runtime_env, split_submit_options
from pixelray.errors import PixelrayError
from pixelray.shapes import caption_correct, train_tokenizer, write_dataset
from pixelray.testing import free_port
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
    assert " INFO " not in local.stderr + local.stdout  # a quiet terminal: Ray's own lines only with --verbose

    # the README's command: a path inside the project ships with the job; the output is absolute
    proc = submit(cluster, "embed", "examples/shapes", "--out", str(tmp_path / "remote"), "--encoder", str(tiny_clip))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = submitted_id(proc)
    # the job's own output came back through the followed logs, and it ran in the uploaded copy
    assert "16 images embedded, 0 errors" in proc.stdout and f"{job_id}: SUCCEEDED" in proc.stdout
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
    assert "16 images captioned, 0 errors" in follow.stdout and f"{job_id}: SUCCEEDED" in follow.stdout
    assert "000009.png: a red star at the bottom" in follow.stdout  # the captions, beside their file names
    # the bundled shapes-demo model is trained: its captions are checked, not just counted
    refs = {Path(json.loads(line)["image"]).name: json.loads(line) for line in (EXAMPLES / "captions.jsonl").open()}
    rows = pq.read_table(tmp_path / "caps" / "captions").to_pylist()
    assert len(rows) == len(refs)
    for row in rows:
        ref = refs[Path(row["path"]).name]
        assert caption_correct(row["caption"], ref["shapes"]), (row["caption"], ref["captions"])
    logs = pixelray("jobs", "logs", job_id, "--address", cluster.address, timeout=60)
    assert logs.returncode == 0 and "16 images captioned, 0 errors" in logs.stdout


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
    proc = submit(cluster, "train", *common, f"output_dir={tmp_path / 'train'}",
                  "stages=[{name: s, train: [projector], max_steps: 3, batch_size: 4, checkpoint_every: 3}]",
                  timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert list(summary["stages"]) == ["s"] and summary["stages"]["s"]["steps"] == 3
    assert (tmp_path / "train" / "s" / "model" / "config.json").exists()

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


# --- access (issue 17): token auth everywhere, Serve's port the one thing exposed, secrets from secrets ---

RAY_UP = PROJECT / "cluster" / "ray-up.yaml"
SERVE_PORT = 8000
TOKEN_SECRET = {"mode": "token", "secretName": "pixelray-ray-token"}  # KubeRay puts its auth_token in RAY_AUTH_TOKEN


def kuberay_docs() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text())]


def ray_cluster_specs() -> dict[str, dict]:
    """Every Ray cluster the manifests make: a RayCluster's spec, a RayJob's rayClusterSpec, a RayService's
    rayClusterConfig, by file and resource name."""
    specs = {}
    for name, doc in kuberay_docs():
        spec = doc["spec"]
        for key in ("rayClusterSpec", "rayClusterConfig"):
            spec = spec.get(key, spec)
        if "headGroupSpec" in spec:
            specs[f"{name}: {doc['kind']} {doc['metadata']['name']}"] = spec
    return specs


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_ray_cluster_config_turns_on_token_auth():
    specs = ray_cluster_specs()
    assert len(specs) == 3  # raycluster, rayjob-embed's own cluster, rayservice's
    for where, spec in specs.items():
        assert spec.get("authOptions") == TOKEN_SECRET, where  # KubeRay then sets RAY_AUTH_MODE=token everywhere
        assert "enableIngress" not in spec["headGroupSpec"], where
        for c in containers(spec):  # KubeRay leaves a container's own RAY_AUTH_* alone: none may undo it
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {"value": "token"}).get("value") == "token", where
            assert "value" not in env.get("RAY_AUTH_TOKEN", {}), where
    # the RayJobs on the long-lived cluster run on one that has it
    selected = {doc["spec"]["clusterSelector"]["ray.io/cluster"] for _, doc in kuberay_docs()
                if "clusterSelector" in doc.get("spec", {})}
    assert selected == {"pixelray"} and "raycluster.yaml: RayCluster pixelray" in specs

    # ray up: every process in every node's container, the token copied to Ray's default path on the nodes
    config = yaml.safe_load(RAY_UP.read_text())
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert not {"head_run_options", "worker_run_options"} & set(config["docker"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/pixelray-token"
    # and the image itself: a node started from it without a token does not start
    assert "\nENV RAY_AUTH_MODE=token\n" in (PROJECT / "cluster" / "Dockerfile").read_text()


def test_only_the_serve_port_is_exposed():
    exposed = []  # (where, service spec) of every Service reachable from outside Kubernetes
    for where, spec in ray_cluster_specs().items():
        head = spec["headGroupSpec"]  # GCS, dashboard, client: ClusterIP, and said so (a default can change)
        assert head["serviceType"] == "ClusterIP", where
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where
    for name, doc in kuberay_docs():
        service = doc if doc["kind"] == "Service" else doc["spec"].get("serveService")
        if service and service["spec"].get("type") in ("LoadBalancer", "NodePort"):
            exposed.append((name, service["spec"]))
    assert [name for name, _ in exposed] == ["rayservice.yaml"]  # the Serve app's endpoint, and nothing else
    for name, spec in exposed:
        assert [(p["port"], p.get("targetPort", p["port"])) for p in spec["ports"]] == [(SERVE_PORT, SERVE_PORT)], name

    # ray up: the dashboard on loopback (`ray dashboard` forwards it over ssh); the security group adds Serve alone
    config = yaml.safe_load(RAY_UP.read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in rules] == [(SERVE_PORT, SERVE_PORT, "tcp")]
    assert not any("SecurityGroupIds" in t["node_config"] for t in config["available_node_types"].values())


def test_the_serve_api_key_comes_from_a_secret():
    service = next(doc for name, doc in kuberay_docs() if doc["kind"] == "RayService")
    for c in containers(service["spec"]["rayClusterConfig"]):  # the ingress and the app's builder run on any node
        key = {e["name"]: e for e in c["env"]}["PIXELRAY_API_KEY"]
        assert key["valueFrom"]["secretKeyRef"] == {"name": "pixelray-secrets", "key": "api-key"}, c["name"]
    config = yaml.safe_load(RAY_UP.read_text())
    assert config["file_mounts"]["~/.pixelray/api-key"] == "~/.pixelray/api-key"
    for start in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert "export PIXELRAY_API_KEY=$(cat ~/.pixelray/api-key);" in start  # Ray's workers inherit it
    # and no config sets the key itself (AppArgs.api_key would take it over the env)
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    for app in [*served["applications"], *yaml.safe_load((PROJECT / "serve_apps" / "configs" / "cluster.yaml")
                                                         .read_text())["applications"]]:
        assert "api_key" not in app.get("args", {})


SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.I)


def literal_secrets(node, where: str = "") -> list[str]:
    """Where a config holds a secret's value: an env var named like one given a `value`, a key named like
    one given a string (`secretName` names a Secret), `...KEY=` or `...TOKEN=` with a value that is no
    `$(...)`, a long hex string."""
    found = []
    if isinstance(node, dict):
        if SECRET_NAME.search(str(node.get("name", ""))) and "value" in node:
            found.append(f"{where}.{node['name']}")
        for key, value in node.items():
            if SECRET_NAME.search(key) and isinstance(value, str) and key.lower() != "key" and "/" not in key:
                found.append(f"{where}.{key}")
            found += literal_secrets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_secrets(item, f"{where}[{i}]")
    elif isinstance(node, str):
        if re.search(r"\b[0-9a-fA-F]{32,}\b", node) or re.search(r"(KEY|TOKEN)=(?!\$)", node):
            found.append(where)
        if node.lstrip().startswith(("proxy_location", "env_vars")):  # YAML inside YAML: serveConfigV2, runtimeEnvYAML
            found += literal_secrets(yaml.safe_load(node), where)
    return found


def test_no_config_holds_a_secret():
    configs = [*KUBERAY.glob("*.yaml"), RAY_UP, PROJECT / "cluster" / "runtime_env.yaml",
               *(PROJECT / "serve_apps" / "configs").glob("*.yaml")]
    for path in configs:
        for doc in yaml.safe_load_all(path.read_text()):
            assert literal_secrets(doc) == [], path.name
    assert literal_secrets({"env": [{"name": "PIXELRAY_API_KEY", "value": "k"}]}) == [".env[0].PIXELRAY_API_KEY"]
    assert literal_secrets({"args": {"api_key": "k"}}) == [".args.api_key"]
    assert literal_secrets({"run_options": ["--env RAY_AUTH_TOKEN=abc"]}) == [".run_options[0]"]


@pytest.fixture
def token_head(tmp_path):
    """A throwaway one-node Ray cluster on 127.0.0.1 with token authentication on, started the way KubeRay
    starts a node with authOptions (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN); stopped by killing its process
    group (never `ray stop`: other Ray instances run on this machine)."""
    token, gcs, dashboard = secrets.token_hex(32), free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="pxt", dir="/tmp"))  # short: Ray's socket paths have a limit
    ports = [x for p in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                         "runtime-env-agent-port", "ray-client-server-port") for x in (f"--{p}", str(free_port()))]
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--num-cpus", "1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--temp-dir", str(temp), "--disable-usage-stats", *ports],
        stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while status(address + "/api/gcs_healthz") != 200:  # a public path: up, whatever the token
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "token": token}
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        for p in psutil.process_iter(["cmdline"]):  # anything that left the process group
            if any(str(temp) in part for part in p.info["cmdline"] or ()):
                p.kill()
        shutil.rmtree(temp, ignore_errors=True)


def status(url: str, token: str | None = None) -> int | None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@pytest.mark.slow
def test_a_token_cluster_refuses_whoever_lacks_the_token(token_head, tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    join = f"import ray; ray.init(address={token_head['gcs']!r}); print('joined', ray.cluster_resources()['CPU'])"
    # a driver joining the GCS without the token (gives up after 2 tries, not Ray's 20 one-second ones)
    refused = subprocess.Popen([sys.executable, "-c", join], env={**clean, "RAY_NUM_REDIS_GET_RETRIES": "2"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # the dashboard's job API: 401 without a token, 403 with a wrong one
    jobs = token_head["address"] + "/api/jobs/"
    assert (status(jobs), status(jobs, "0" * 64), status(jobs, token_head["token"])) == (401, 403, 200)
    # `pixelray jobs` says what is missing, and sends the token of RAY_AUTH_TOKEN_PATH (a file, as users keep it)
    without = pixelray("jobs", "list", "--address", token_head["address"], timeout=60)
    assert without.returncode == 2 and "Authentication required" in without.stderr, without.stderr[-2000:]
    assert "RAY_AUTH_TOKEN" in without.stderr
    (tmp_path / "token").write_text(token_head["token"] + "\n")
    with_token = subprocess.run([sys.executable, "-m", "pixelray.cli", "jobs", "list", "--address",
                                 token_head["address"]], cwd=PROJECT, capture_output=True, text=True, timeout=60,
                                env={**clean, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")})
    assert with_token.returncode == 0 and with_token.stdout.startswith("JOB"), with_token.stderr[-2000:]

    out, err = refused.communicate(timeout=120)
    assert refused.returncode != 0 and "joined" not in out and "InvalidAuthToken" in err, err[-2000:]
    joined = subprocess.run([sys.executable, "-c", join], capture_output=True, text=True, timeout=120,
                            env={**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_head["token"]})
    assert joined.returncode == 0 and "joined 1.0" in joined.stdout, joined.stderr[-2000:]
