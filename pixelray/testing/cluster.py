"""A real two-node Ray cluster on 127.0.0.1 for tests, started as a user starts one:

    ray start --head --dashboard-host 127.0.0.1 ...     (the dashboard serves the Job Submission API)
    ray start --address 127.0.0.1:PORT ...              (a worker node)

The head has no CPUs, so every task and actor of a job runs on the worker node. Each `ray start`
runs with --block in its own process group, so stopping the cluster kills exactly what it started
(never `ray stop`, which would take the test session's own Ray with it); every port is a free one,
and the cluster's temp dir is its own, so no other `ray.init()` on this machine finds and joins it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from pixelray.testing import free_port

RAY = str(Path(sys.executable).parent / "ray")


class LocalCluster:
    def __init__(self, worker_cpus: int = 2):
        self.worker_cpus = worker_cpus
        self.dir = Path(tempfile.mkdtemp(prefix="pxr", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> None:
        ports = {f"--{p}": str(free_port()) for p in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "metrics-export-port", "runtime-env-agent-port")}
        log = open(self.dir / f"{name}.log", "w")
        # as started from an activated virtualenv: a job's `python` is this environment's
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.procs.append(subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
             *[x for kv in ports.items() for x in kv], *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env))

    def api(self, path: str):
        with urllib.request.urlopen(self.address + path, timeout=5) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def start(self, timeout_s: float = 120) -> "LocalCluster":
        self._start("head", "--head", "--port", str(self.gcs_port), "--num-cpus", "0",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                    "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.dir))
        # a temp dir of its own: two nodes on one machine sharing one would share (and delete) each
        # other's runtime_env working dirs, the job driver's current directory among them
        self._start("worker", "--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(self.worker_cpus),
                    "--temp-dir", str(self.dir / "w"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                if len(self.alive_nodes()) == 2:
                    return self
            except OSError:
                pass
            time.sleep(1)
        logs = "\n".join(f.read_text()[-2000:] for f in self.dir.glob("*.log"))
        self.stop()
        raise RuntimeError(f"the local Ray cluster did not come up:\n{logs}")

    def processes(self) -> list[psutil.Process]:
        """Every process on this machine that belongs to this cluster (its temp dir is in its command line)."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if any(str(self.dir) in part for part in p.info["cmdline"] or ()):
                found.append(p)
        return found

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
        for p in self.processes():  # anything that left the process groups
            p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
