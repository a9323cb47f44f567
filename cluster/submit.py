"""Submit pixelray jobs to a Ray cluster with Ray's Job Submission SDK, and follow, list, stop them.

    pixelray submit embed examples/shapes --out s3://bucket/features --address http://HEAD:8265
    pixelray submit caption s3://bucket/photos --out s3://bucket/captions --model qwen2-vl-2b --no-wait
    pixelray submit train --config train_jobs/configs/small_scale.yaml output_dir=/mnt/shared/run1
    pixelray jobs list | logs JOB [--follow] | stop JOB     (all with --address)

The job runs the same `pixelray` command on the cluster, in a copy of this project that Ray uploads
with the job (cluster/runtime_env.yaml: the project as working_dir, .gitignore'd files left out, and
the Python packages of cluster/requirements.txt on top of the cluster's Ray). Paths inside the
project (examples/shapes, train_jobs/configs/...) travel with it; outputs must go where the cluster
writes and you can read: a URI (s3://, gs://, ...) or an absolute path on a filesystem every node
mounts. `submit` checks this before uploading anything, then follows the job's logs and returns its
exit status (`--no-wait` prints the job's id and returns at once; Ctrl-C stops following, not the job).

The address is the dashboard's (http://HEAD:8265; default: RAY_ADDRESS, else a local cluster). A cluster
with token authentication (every config in cluster/) wants its token: RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH
naming a file that holds it, is sent with every request. (Ray's job SDK sends a token itself only when
RAY_AUTH_MODE=token is set too, as Ray's own CLIs need: `serve deploy`, `ray job`.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from pixelray.errors import PixelrayError
from pixelray.runtime import CHECKOUT_EXCLUDES
from pixelray.train_jobs.config import load_config

PROJECT = Path(__file__).resolve().parents[1]
RUNTIME_ENV = Path(__file__).resolve().parent / "runtime_env.yaml"
JOBS = ("embed", "caption", "train", "eval", "index", "dedup")
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")


def _is_uri(path: str) -> bool:
    return "://" in path


def shipped_path(path: str, what: str, cwd: Path) -> str:
    """A local file or folder the job reads, as the job sees it: relative to the project root, which
    Ray uploads as the job's working dir. A URI or an absolute path is taken to be on the cluster."""
    if _is_uri(path) or Path(path).is_absolute():
        return path
    local = (cwd / path).resolve()
    if not local.exists():
        raise PixelrayError(f"{what} {path!r} does not exist here (a relative path must be inside the project, "
                            f"which ships with the job; use a URI or an absolute path on the cluster otherwise)")
    if not local.is_relative_to(PROJECT):
        raise PixelrayError(f"{what} {path!r} is outside the project ({PROJECT}) and would not ship with the job: "
                            f"put it on storage the cluster reads (s3://..., a shared mount) and give that path")
    return str(local.relative_to(PROJECT))


def check_output(path: str, what: str, uri_ok: bool = True) -> None:
    """Where the job writes must outlive the job's temporary working dir."""
    if (uri_ok and _is_uri(path)) or (not _is_uri(path) and Path(path).is_absolute()):
        return
    where = "a URI (s3://, gs://, ...) or an absolute path" if uri_ok else "an absolute path"
    raise PixelrayError(f"{what} {path!r} would be written inside the job's temporary copy of the project on the "
                        f"cluster and lost: give {where} on storage every node writes to and you can read")


def job_command(job: str, argv: list[str], args: argparse.Namespace, cwd: Path | None = None) -> list[str]:
    """A `pixelray JOB argv...` command (`args`: the command line's parse of it) as the cluster runs it:
    its paths made relative to the project root, its outputs checked to outlive the job."""
    cwd = cwd or Path.cwd()
    if job not in JOBS:
        raise PixelrayError(f"pixelray submit runs one of {', '.join(JOBS)}, not {job!r}")
    argv, shipped = list(argv), {}
    for name, what in (("input", "INPUT"), ("questions", "--questions"), ("config", "--config"),
                       ("references", "--references"), ("predictions", "PREDICTIONS")):
        value = getattr(args, name, None)
        if value:
            shipped[name] = shipped_path(value, what, cwd)
            argv = _replace_value(argv, value, shipped[name])
    if job in ("embed", "caption", "eval") and getattr(args, "out", None):
        check_output(args.out, "--out", uri_ok=job != "eval")
    if job == "train":
        cfg = load_config(PROJECT / shipped["config"], args.overrides)
        check_output(cfg.output_dir, "output_dir (set it with output_dir=/shared/path)", uri_ok=False)
    return ["python", "-m", "pixelray.cli", job, *argv]


def _replace_value(argv: list[str], value: str, new: str) -> list[str]:
    """argv with its first `value` (alone or as `--option=value`) replaced by `new`."""
    for i, token in enumerate(argv):
        if token == value or (token.startswith("--") and token.endswith("=" + value)):
            return [*argv[:i], token[:len(token) - len(value)] + new, *argv[i + 1:]]
    return argv


def runtime_env(path: str | Path | None = None, pip: bool = True) -> dict:
    """The runtime_env of a submitted job: cluster/runtime_env.yaml (or `path`), its working_dir and
    requirements file resolved against the project root, and what a job does not need of the checkout
    left out (pixelray.runtime.CHECKOUT_EXCLUDES, unless the file lists its own `excludes`)."""
    path = Path(path) if path else RUNTIME_ENV
    env = yaml.safe_load(path.read_text()) or {}
    if "working_dir" in env and not _is_uri(env["working_dir"]):
        env["working_dir"] = str((PROJECT / env["working_dir"]).resolve())
        env.setdefault("excludes", CHECKOUT_EXCLUDES)
    if not pip:
        env.pop("pip", None)
    elif isinstance(env.get("pip"), str) and not _is_uri(env["pip"]):
        env["pip"] = str(PROJECT / env["pip"])
    return env


def auth_headers() -> dict[str, str]:
    """The cluster's token as the dashboard wants it, from RAY_AUTH_TOKEN or else the file RAY_AUTH_TOKEN_PATH
    names (Ray's own order); none set: no header (Ray's SDK then follows RAY_AUTH_MODE)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise PixelrayError(f"RAY_AUTH_TOKEN_PATH {path}: {e.strerror}") from e
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers())


def submit(job: str, argv: list[str], args: argparse.Namespace, address: str | None = None,
           env_file: str | None = None, pip: bool = True, wait: bool = True, out=sys.stdout) -> int:
    """Submit `pixelray JOB argv...` (`args`: its parse); with `wait`, follow its logs and return its exit
    status."""
    entrypoint = shlex.join(job_command(job, argv, args, Path.cwd()))
    jobs = client(address)
    submission_id = f"pixelray-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(env_file, pip),
                    submission_id=submission_id, metadata={"pixelray_job": job})
    print(f"submitted {submission_id}: {entrypoint}", file=out, flush=True)
    if not wait:
        print(f"follow it with `pixelray jobs logs {submission_id} --follow`", file=out)
        return 0
    return follow(jobs, submission_id, out)


def follow(jobs, submission_id: str, out=sys.stdout) -> int:
    """Print the job's logs as they come until it ends; its exit status (Ctrl-C: stop following)."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(submission_id):
            out.write(lines)
            out.flush()

    # a plain loop, not asyncio.run: Ctrl-C must raise here at once, not cancel a task that aiohttp's
    # websocket receive can outlive
    loop = asyncio.new_event_loop()
    task = loop.create_task(tail())
    try:
        loop.run_until_complete(task)
    except KeyboardInterrupt:
        task.cancel()
        loop.run_until_complete(asyncio.wait([task], timeout=2))  # a moment for aiohttp to close its session
        print(f"\nstopped following; {submission_id} goes on (`pixelray jobs stop {submission_id}` stops it)",
              file=sys.stderr)
        return 130
    finally:
        loop.close()
    return exit_status(jobs, submission_id, out)


def exit_status(jobs, submission_id: str, out=sys.stdout) -> int:
    """0 for a job that succeeded; its driver's exit code (or 1) for one that failed or was stopped."""
    while (info := jobs.get_job_info(submission_id)).status.value not in FINISHED:  # logs end just before
        time.sleep(0.2)
    print(f"{submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""), file=out)
    if info.status.value == "SUCCEEDED":
        return 0
    return info.driver_exit_code or 1


def list_jobs(address: str | None, out=sys.stdout) -> int:
    rows = sorted(client(address).list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'JOB':44s} {'STATUS':10s} {'STARTED':19s} {'SECONDS':>8s}  COMMAND", file=out)
    for j in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else ""
        seconds = f"{((j.end_time or time.time() * 1000) - j.start_time) / 1000:.0f}" if j.start_time else ""
        print(f"{j.submission_id or j.job_id:44s} {j.status.value:10s} {started:19s} {seconds:>8s}  {j.entrypoint}",
              file=out)
    return 0


def logs(address: str | None, submission_id: str, follow_logs: bool = False, out=sys.stdout) -> int:
    jobs = client(address)
    if follow_logs:
        return follow(jobs, submission_id, out)
    out.write(jobs.get_job_logs(submission_id))
    return 0


def stop(address: str | None, submission_id: str, timeout_s: float = 60, out=sys.stdout) -> int:
    """Stop a job and wait (up to timeout_s) until Ray says it has stopped."""
    jobs = client(address)
    if not jobs.stop_job(submission_id):
        print(f"{submission_id} had already ended: {jobs.get_job_status(submission_id).value}", file=out)
        return 0
    deadline = time.monotonic() + timeout_s
    while (status := jobs.get_job_status(submission_id).value) not in FINISHED and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"{submission_id}: {status}", file=out)
    return 0 if status in FINISHED else 1


# Options of `pixelray submit` itself, taken out of the job's arguments wherever they appear.
SUBMIT_OPTIONS = {"--address": True, "--runtime-env": True, "--no-wait": False, "--no-pip": False}


def split_submit_options(argv: list[str]) -> tuple[dict, list[str]]:
    """Separate `--address URL --runtime-env FILE --no-wait --no-pip` from the job's arguments."""
    options, rest, i = {}, [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in SUBMIT_OPTIONS:
            if SUBMIT_OPTIONS[name] and not eq:
                if i + 1 == len(argv):
                    raise PixelrayError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            options[name.lstrip("-").replace("-", "_")] = value if SUBMIT_OPTIONS[name] else True
        else:
            rest.append(argv[i])
        i += 1
    return options, rest


@contextmanager
def sdk_errors():
    """The SDK's failures (no dashboard at the address, a missing or wrong token, an unknown job id) as
    PixelrayError."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise PixelrayError(f"{str(e).splitlines()[0]} (set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, to the "
                            f"cluster's token)") from e
    except ConnectionError as e:
        raise PixelrayError(f"{e} (--address is the dashboard's: http://HEAD:8265)") from e
    except RuntimeError as e:
        if not str(e).startswith("Request failed"):
            raise
        raise PixelrayError(str(e)) from e
