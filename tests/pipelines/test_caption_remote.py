"""`pixelray caption` with a remote model (OpenAI-compatible servers, sent the images): against `pixelray serve`
with the bundled model, image for image the local backend's captions and answers (the job of the quickstart,
pointed at a server); against `mlx_vlm.server`; and over two servers, one of them killed mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

from pixelray.errors import TRANSIENT
from pixelray.generators import GenerationConfig, create_generator, user_turn
from pixelray.hybrid import LLMServerError
from pixelray.hybrid.client import API_KEY_ENV
from pixelray.pipelines.caption import CaptionConfig, run_caption
from pixelray.testing import free_port
from pixelray.testing.images import random_images, write_folder
from pixelray.testing.tiny_mlx import mlx_vlm_server, save_in_subprocess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "shapes"
KEY = "remote-key"
MLX_CAPTIONS = """
import json, sys
from pixelray.generators import GenerationConfig, create_generator
model = create_generator(f"mlx:{sys.argv[1]}", device="cpu")
results = model.generate(sys.argv[2:], "Describe the image.", GenerationConfig(max_new_tokens=8))
print(json.dumps([[r.text, r.num_tokens] for r in results]))
"""


@pytest.fixture(scope="module")
def upstream(serve_url):
    """`pixelray serve`'s app on 127.0.0.1 with the bundled shapes-demo model, behind an API key."""
    from ray import serve

    from pixelray.serve_apps.vlm import build_app

    serve.run(build_app({"models": [{"name": "shapes-demo", "device": "cpu", "num_cpus": 0.25, "max_batch_size": 16}],
                         "api_key": KEY}), name="upstream", route_prefix="/")
    yield f"{serve_url}/v1"
    serve.delete("upstream")


def by_path(store: Path, table: str) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in pq.read_table(store / table).to_pylist()}


def test_remote_job_writes_the_local_backends_captions_and_answers(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)  # the actors get it from the driver's environment, never from the name
    remote = run_caption(CaptionConfig(input=str(EXAMPLES), out=str(tmp_path / "remote"),
                                       model=f"remote:shapes-demo?url={upstream}"))
    theirs = by_path(tmp_path / "remote", "captions")
    paths = sorted((EXAMPLES / "images").glob("*.png"))
    assert (remote.written, remote.errors, len(theirs)) == (len(paths), 0, len(paths))
    model = create_generator("shapes-demo", device="cpu")  # the local backend, as `pixelray caption` runs it
    ours = model.generate(paths, "Describe the image.", GenerationConfig())
    for path, result in zip(paths, ours):
        row = theirs[path.name]
        assert (row["caption"], row["num_tokens"], row["finish_reason"]) == (
            result.text, result.num_tokens, result.finish_reason), path.name
    assert {r["model"] for r in theirs.values()} == {"remote:shapes-demo"}  # where it ran is not part of it
    manifest = json.loads((tmp_path / "remote" / "pixelray.json").read_text())
    assert upstream not in json.dumps(manifest) and KEY not in json.dumps(manifest)

    # VQA: the questions file's answers, as the model gives them in this process
    vqa = run_caption(CaptionConfig(questions=str(EXAMPLES / "questions.jsonl"), out=str(tmp_path / "vqa"),
                                    model=f"remote:shapes-demo?url={upstream}", generation={"max_new_tokens": 16}))
    answers = pq.read_table(tmp_path / "vqa" / "captions").to_pylist()
    assert vqa.errors == 0 and len(answers) == vqa.written > 0
    from ray import serve

    from pixelray.serve_apps.vlm import deployment_name

    # many requests in flight at once: the server batched them
    stats = serve.get_deployment_handle(deployment_name("shapes-demo"), app_name="upstream").stats.remote().result()
    assert stats["batched_requests"] >= remote.written + vqa.written > 2 * stats["batches"]
    expected = model.answer_batch([r["path"] for r in answers], [r["question"] for r in answers], max_new_tokens=16)
    assert [r["answer"] for r in answers] == expected


def test_a_wrong_key_is_a_lasting_error_and_settings_are_checked(upstream, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "wrong")
    gen = create_generator(f"remote:shapes-demo?url={upstream}")
    [outcome] = gen.chat_items([[user_turn("Describe the image.")]], [random_images(1)], GenerationConfig())
    assert isinstance(outcome, LLMServerError) and "HTTP 401" in str(outcome) and not outcome.transient
    with pytest.raises(ValueError, match="names no server"):
        create_generator("remote:shapes-demo")
    with pytest.raises(ValueError, match="unknown setting 'api_key'"):
        create_generator(f"remote:shapes-demo?url={upstream}&api_key=x")


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """The OpenAI-shaped test server in a process of its own (killed as a crash kills it)."""
    proc = subprocess.Popen([sys.executable, "-m", "pixelray.testing.llm_servers", *args], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    return proc, proc.stdout.readline().strip()


def served(url: str) -> int:
    return requests.get(url.removesuffix("/v1") + "/stats", timeout=5).json()["requests"]


@pytest.mark.slow
def test_one_of_two_servers_killed_mid_job(ray_address, tmp_path):
    """Two servers, one killed (SIGKILL) once it has answered a few requests: every image ends as a caption or a
    retryable error row, none twice, and the job finishes on the survivor."""
    folder = tmp_path / "imgs"
    write_folder(folder, 40, bad=False)
    # (both equally slow, so that the fewest-in-flight choice shares the requests between them)
    (doomed, doomed_url), (survivor, survivor_url) = (start_server("ok", "--delay", "0.05") for _ in range(2))
    killed = threading.Event()
    received_at_kill: list[int] = []

    def kill_after_a_few() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (received := served(doomed_url)) >= 4:
                os.kill(doomed.pid, signal.SIGKILL)
                received_at_kill.append(received)
                killed.set()
                return
            time.sleep(0.01)

    try:
        watcher = threading.Thread(target=kill_after_a_few, daemon=True)
        watcher.start()
        summary = run_caption(CaptionConfig(
            input=str(folder), out=str(tmp_path / "out"), num_generators=1, generation={"max_new_tokens": 4},
            model=f"remote:m?url={doomed_url}&url={survivor_url}&max_in_flight=4&max_retries=1&max_retry_wait=0.1"))
        watcher.join(timeout=5)
        assert killed.is_set() and doomed.wait(timeout=10) == -signal.SIGKILL
        after_kill = served(survivor_url)
    finally:
        for proc in (doomed, survivor):
            proc.kill()
            proc.wait()
    captions = pq.read_table(tmp_path / "out" / "captions").to_pylist()
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist() if (tmp_path / "out" / "errors").exists() else []
    ids = [r["image_id"] for r in captions + errors]
    assert len(ids) == len(set(ids)) == 40 == summary.written + summary.errors
    assert all(e["error_type"] == TRANSIENT for e in errors)
    assert summary.written == 40  # the survivor took the killed server's requests: nothing was left failed
    assert after_kill >= 40 - received_at_kill[0] - 4  # (4 at most reached it after the count was read)
    assert all(c["caption"].startswith("caption ") for c in captions)


@pytest.mark.slow
def test_against_mlx_vlm_server(ray_address, tmp_path):
    """`python -m mlx_vlm.server` (mlx-vlm's CPU build) serving a tiny Qwen2-VL: the remote backend's captions
    are those the mlx backend gives for the same model and images, greedy, token for token."""
    model = save_in_subprocess(tmp_path / "mlx-model")
    with mlx_vlm_server(model, tmp_path / "mlx-server.log", free_port()) as (_, url):
        folder = tmp_path / "imgs"
        folder.mkdir()
        for i, image in enumerate(random_images(4)):
            image.save(folder / f"{i}.png")  # (lossless: the server sees the pixels the local model sees)
        summary = run_caption(CaptionConfig(input=str(folder), out=str(tmp_path / "out"), batch_size=2,
                                            model=f"remote:?url={url}", generation={"max_new_tokens": 8}))
        rows = by_path(tmp_path / "out", "captions")
        assert (summary.written, summary.errors) == (4, 0)
        # the mlx backend in a process of its own (mlx-vlm, once imported, changes how transformers' processors
        # answer in the process that imported it)
        local = subprocess.run([sys.executable, "-c", MLX_CAPTIONS, str(model),
                                *(str(folder / f"{i}.png") for i in range(4))],
                               capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert local.returncode == 0, local.stderr[-2000:]
        expected = json.loads(local.stdout.strip().splitlines()[-1])
        # the same tokens; random weights make bytes that are no UTF-8, which the server shows as U+FFFD
        assert [[rows[f"{i}.png"]["caption"].replace("\ufffd", ""), rows[f"{i}.png"]["num_tokens"]]
                for i in range(4)] == [[text.replace("\ufffd", ""), tokens] for text, tokens in expected]
