"""The Serve app with a vllm model (vLLM's CPU build, async engine), through real HTTP on 127.0.0.1:
the same API as the other engines, greedy replies equal to the hf backend's, streamed and concurrent
requests sharing the engine's batch, a client that disconnects cancelling its generation, and a caption job
whose remote model is this server."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from pixelray.generators import GenerationConfig, create_generator
from pixelray.testing import wait_until
from pixelray.testing.images import random_rgb
from pixelray.testing.prometheus import metrics_port, scrape, since, total

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

KEY = "vllm-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 1500  # tokens: far longer than the test waits before it disconnects
METRICS_REPORTED_S = 12  # a process's metrics reach Ray's endpoint within RAY_metrics_report_interval_ms (10 s)


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    random_rgb(48, 40, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def messages(seed: int, text: str = "Describe the image.", images: int = 1) -> list[dict]:
    url = f"data:image/png;base64,{base64.b64encode(png(seed)).decode()}"
    return [{"role": "user", "content": [*[{"type": "image_url", "image_url": {"url": url}}] * images,
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(serve_url, tiny_qwen2_vl_h128):
    from ray import serve

    from pixelray.serve_apps.vlm import build_app, deployment_name

    source = f"vllm:{tiny_qwen2_vl_h128}?max_model_len=2048&max_num_seqs=8&kv_cache_gib=0.25"
    app = build_app({"models": [{"name": "tiny-vllm", "source": source, "dtype": "fp32", "num_cpus": 0.25,
                                 "max_new_tokens": LONG}], "api_key": KEY})
    serve.run(app, name="vlm", route_prefix="/")
    yield serve_url, serve.get_deployment_handle(deployment_name("tiny-vllm"), app_name="vlm")
    serve.delete("vlm")


def complete(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", json={"model": "tiny-vllm", **body}, headers=AUTH, timeout=120)


def test_replies_equal_the_hf_backend_plain_streamed_and_on_the_seed_api(server, tiny_qwen2_vl_h128):
    from openai import OpenAI

    url, _ = server
    hf = create_generator(f"hf:{tiny_qwen2_vl_h128}", device="cpu", dtype="fp32")
    expected = hf.generate([Image.open(io.BytesIO(png(1)))], "Describe the image.",
                           GenerationConfig(max_new_tokens=24))[0]
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    plain = client.chat.completions.create(model="tiny-vllm", messages=messages(1), max_tokens=24)
    assert plain.choices[0].message.content == expected.text
    assert plain.usage.completion_tokens == expected.num_tokens
    assert plain.usage.prompt_tokens == expected.prompt_tokens

    chunks = list(client.chat.completions.create(model="tiny-vllm", messages=messages(1), max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.num_tokens

    seed_api = requests.post(f"{url}/caption", files={"image": ("a.png", png(1), "image/png")},
                             data={"max_new_tokens": "24"}, headers=AUTH, timeout=120)
    assert seed_api.status_code == 200 and seed_api.json()["caption"] == expected.text


def test_a_remote_caption_job_against_the_engine(server, tiny_qwen2_vl_h128, tmp_path, monkeypatch):
    """`pixelray caption --model remote:tiny-vllm?url=...`: the hf backend's captions, image for image."""
    import pyarrow.parquet as pq

    from pixelray.hybrid.client import API_KEY_ENV
    from pixelray.pipelines.caption import CaptionConfig, run_caption

    url, _ = server
    monkeypatch.setenv(API_KEY_ENV, KEY)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for seed in range(3):
        (folder / f"{seed}.png").write_bytes(png(seed))
    summary = run_caption(CaptionConfig(input=str(folder), out=str(tmp_path / "out"), generation={"max_new_tokens": 24},
                                        model=f"remote:tiny-vllm?url={url}/v1"))
    rows = {Path(r["path"]).name: r for r in pq.read_table(tmp_path / "out" / "captions").to_pylist()}
    hf = create_generator(f"hf:{tiny_qwen2_vl_h128}", device="cpu", dtype="fp32")
    expected = hf.generate([Image.open(io.BytesIO(png(seed))) for seed in range(3)], "Describe the image.",
                           GenerationConfig(max_new_tokens=24))
    assert (summary.written, summary.errors) == (3, 0)
    assert [(rows[f"{seed}.png"]["caption"], rows[f"{seed}.png"]["num_tokens"]) for seed in range(3)] == [
        (e.text, e.num_tokens) for e in expected]


def test_concurrent_plain_and_streamed_requests_share_the_running_batch(server):
    url, handle = server
    in_engine, done = [], threading.Event()
    port = metrics_port()
    time.sleep(METRICS_REPORTED_S)  # the earlier tests' requests are in the first scrape, not counted as these

    def watch():
        while not done.is_set():
            in_engine.append(handle.stats.remote().result()["unfinished"])
            time.sleep(0.05)

    def one(i: int) -> tuple[int, int]:
        body = dict(messages=messages(i), max_tokens=100 + 20 * i)
        if i % 2:  # streamed: count the content chunks
            with requests.post(f"{url}/v1/chat/completions", json={"model": "tiny-vllm", "stream": True, **body},
                               headers=AUTH, stream=True, timeout=120) as r:
                events = [line for line in r.iter_lines() if line.startswith(b"data: {")]
            assert r.status_code == 200 and not any(b'"error"' in e for e in events)
            return r.status_code, len(events)
        r = complete(url, **body)
        assert r.json()["usage"]["completion_tokens"] <= body["max_tokens"]
        return r.status_code, r.json()["usage"]["completion_tokens"]

    before = scrape(port)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
    finally:
        done.set()
        watcher.join()
    assert [status for status, _ in results] == [200] * 8
    assert max(in_engine) >= 4, f"the engine never held several requests at once: {sorted(set(in_engine))}"

    # Prometheus: pixelray's series for the model, and the engine's own through Ray's metrics (its gauges, set
    # only while it works, are not asserted: a scrape after the load may no longer hold them)
    def grown(name: str, **labels: str) -> float:
        return total(since(before, after), name, **labels)

    def counted() -> bool:
        nonlocal after
        after = scrape(port)
        return [grown("ray_pixelray_serve_requests_total", model="tiny-vllm", status="200"),
                grown("ray_pixelray_serve_ttft_seconds_count", model="tiny-vllm"),
                grown("ray_vllm_request_success_total")] == [8, 8, 8]

    after: list = []
    wait_until(counted, 60, "the series to count the requests")


def test_a_client_that_disconnects_cancels_its_generation(server):
    url, handle = server
    control = complete(url, messages=messages(3), max_tokens=LONG).json()
    assert control["choices"][0]["finish_reason"] == "length"  # undisturbed, this reply runs to the limit
    assert control["usage"]["completion_tokens"] == LONG
    before = handle.stats.remote().result()["cancelled"]

    with requests.post(f"{url}/v1/chat/completions", headers=AUTH, stream=True, timeout=120,
                       json={"model": "tiny-vllm", "messages": messages(3), "max_tokens": LONG, "stream": True}) as r:
        first = None
        for line in r.iter_lines():  # read until the first piece of text, then hang up
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                first = line
                break
    assert first is not None

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = handle.stats.remote().result()
        if stats["unfinished"] == 0 and stats["cancelled"] > before:
            break
        time.sleep(0.1)
    assert stats["unfinished"] == 0, stats
    assert stats["cancelled"] == before + 1 and 0 < stats["last_cancelled_tokens"] < LONG, stats
    assert complete(url, messages=messages(4), max_tokens=8).status_code == 200  # the engine serves on


def test_an_input_the_engine_refuses_is_a_clean_400(server):
    url, _ = server
    r = complete(url, messages=messages(5, images=2), max_tokens=8)  # the engine takes one image per prompt
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "model_input" and "image" in error["message"]
    for internal in ("Traceback", "ray::", "pid=", "actor_id", ".py", "/tmp"):  # what was wrong, not where
        assert internal not in r.text, r.text
    assert complete(url, messages=messages(5), max_tokens=8).status_code == 200
