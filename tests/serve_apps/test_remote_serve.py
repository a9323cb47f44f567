"""Models behind other servers in `pixelray serve`: an app that fronts a remote fleet (here, another pixelray app
with the bundled model) answers as that fleet does; the remote and hybrid models stream their upstream's tokens
through as they arrive, and a client that goes away closes the upstream request; /v1/models says what each
model takes, and `pixelray models --url` reads it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pixelray.generators.remote import discover
from pixelray.testing.llm_servers import FailingLLM

SHAPES = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "images"
DELAY = 0.5  # seconds between the slow upstream's chunks


@pytest.fixture(scope="module")
def apps(serve_url, tiny_clip):
    """Two apps on one proxy: `upstream` (the bundled shapes-demo, at /up) and `front` (at /): shapes-demo through
    the remote backend from /up, and a remote and a hybrid model in front of a slowly streaming server."""
    from ray import serve

    from pixelray.serve_apps.vlm import build_app

    slow = FailingLLM("ok", delay=DELAY)
    base = serve_url
    serve.run(build_app({"models": [{"name": "shapes-demo", "device": "cpu", "num_cpus": 0.2}]}),
              name="upstream", route_prefix="/up")
    models = [{"name": "shapes-remote", "source": f"remote:shapes-demo?url={base}/up/v1", "num_cpus": 0.1},
              {"name": "slow-remote", "source": f"remote:m?url={slow.url}", "num_cpus": 0.1},
              {"name": "slow-hybrid", "source": f"hybrid:{tiny_clip}?url={slow.url}&model=m", "device": "cpu",
               "num_cpus": 0.1}]
    serve.run(build_app({"models": models}), name="front", route_prefix="/")
    yield base, slow
    serve.delete("front")
    serve.delete("upstream")
    slow.shutdown()


def image_message(name: str = "000009.png", text: str = "Describe the image.") -> list[dict]:
    url = f"data:image/png;base64,{base64.b64encode((SHAPES / name).read_bytes()).decode()}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_a_front_app_answers_as_its_remote_fleet(apps):
    base, _ = apps
    for name in ("000003.png", "000009.png"):
        body = {"messages": image_message(name), "max_tokens": 24}
        direct = requests.post(f"{base}/up/v1/chat/completions", json={**body, "model": "shapes-demo"}, timeout=60)
        front = requests.post(f"{base}/v1/chat/completions", json={**body, "model": "shapes-remote"}, timeout=60)
        assert direct.status_code == front.status_code == 200, front.text
        assert front.json()["choices"][0]["message"]["content"] == direct.json()["choices"][0]["message"]["content"]
        assert front.json()["usage"]["completion_tokens"] == direct.json()["usage"]["completion_tokens"]
    # streamed through the front, the pieces add up to the same reply
    body = {"messages": image_message(), "max_tokens": 24, "stream": True, "model": "shapes-remote"}
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    direct = requests.post(f"{base}/up/v1/chat/completions", json={**body, "stream": False, "model": "shapes-demo"},
                           timeout=60)
    assert text == direct.json()["choices"][0]["message"]["content"] and text


@pytest.mark.parametrize("model", ["slow-remote", "slow-hybrid"])
def test_the_upstreams_tokens_stream_through_as_they_arrive(apps, model):
    """The first piece reaches the client while the upstream is still sending (its chunks are DELAY s apart)."""
    base, slow = apps
    slow.stream_ended = None
    body = {"model": model, "messages": image_message(), "max_tokens": 8, "stream": True}
    arrivals = []
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(b"data: {") and (delta := json.loads(line[6:])["choices"]) and \
                    delta[0]["delta"].get("content"):
                arrivals.append((time.monotonic(), delta[0]["delta"]["content"]))
    assert "".join(piece for _, piece in arrivals).startswith("caption ")
    assert len(arrivals) == 2 and slow.stream_ended is not None
    assert arrivals[0][0] < slow.stream_ended - DELAY  # the first piece came a whole chunk before the end


def test_a_client_that_disconnects_closes_the_upstream_request(apps):
    from ray import serve

    from pixelray.serve_apps.vlm import deployment_name

    base, slow = apps
    handle = serve.get_deployment_handle(deployment_name("slow-remote"), app_name="front")
    before, slow.stream_ended = handle.stats.remote().result()["cancelled"], None
    body = {"model": "slow-remote", "messages": image_message(), "max_tokens": 8, "stream": True}
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        next(line for line in r.iter_lines() if b'"content":"caption"' in line.replace(b" ", b""))
    deadline = time.monotonic() + 20  # gone after its first piece: the replica stops reading at the next chunk
    while (stats := handle.stats.remote().result())["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats["cancelled"] == before + 1 and stats["last_cancelled_tokens"] >= 1
    time.sleep(4 * DELAY)
    assert slow.stream_ended is None  # the upstream's stream was closed before its end


def test_models_say_what_they_take(apps):
    base, _ = apps
    listed = requests.get(f"{base}/up/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["type"]) for m in listed] == [("shapes-demo", "vlm")]
    result = subprocess.run([sys.executable, "-m", "pixelray.cli", "models", "--url", f"{base}/up/v1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shapes-demo" in result.stdout and "images" in result.stdout and "listed as vlm" in result.stdout
    # a server whose listing does not say: one probe with a tiny image (answered: yes; refused: no)
    answering, refusing, failing = FailingLLM("ok"), FailingLLM("400"), FailingLLM("500")
    try:
        [found] = discover(answering.url)
        assert (found.id, found.images, answering.requests) == ("m", True, 1)
        assert discover(refusing.url)[0].images is False
        assert discover(failing.url)[0].images is None  # a server error tells nothing
        assert discover(answering.url, probe=False)[0].images is None and answering.requests == 1
    finally:
        for server in (answering, refusing, failing):
            server.shutdown()
