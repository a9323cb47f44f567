"""A job killed as a crash kills it: `kill -9` of a driver started in its own session, then every process
that session left behind (its local Ray: raylet, workers), waiting for those that could still write.

    proc = subprocess.Popen(cmd, start_new_session=True, ...)
    ...
    kill_session(proc)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil


def session_processes(sid: int, workers_only: bool = False) -> list[psutil.Process]:
    """Processes of a session; with workers_only, those that can still write output (raylet, workers)."""
    procs = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) != sid:
                continue
            cmd = " ".join(p.cmdline()).strip()
            if workers_only and not ("raylet" in cmd or cmd.startswith("ray::") and not cmd.endswith("Agent")):
                continue
            procs.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return procs


def kill_session(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL the driver, wait (up to `timeout`) for the workers its local Ray leaves, then kill the rest."""
    try:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.time() + timeout  # the driver's local Ray dies with it: wait for the last of its workers
        while session_processes(proc.pid, workers_only=True) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for p in session_processes(proc.pid):
            p.kill()
