"""The Serve app's Prometheus series (pixelray.telemetry), scraped from Ray's own metrics endpoint after real
requests over HTTP: the counts in the series are the counts of what was sent."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from pixelray import telemetry
from pixelray.testing import wait_until
from pixelray.testing.prometheus import metrics_port, scrape, since, total

SHAPES = Path(__file__).resolve().parents[2] / "examples" / "shapes"
IMAGE = (SHAPES / "images/000002.png").read_bytes()
MODEL = "metered"  # a name no other test's series carry


@pytest.fixture(scope="module")
def server(serve_url):
    from ray import serve

    from pixelray.serve_apps.vlm import build_app

    serve.run(build_app({"models": [{"name": MODEL, "source": "shapes-demo", "device": "cpu", "num_cpus": 0.25,
                                     "max_batch_size": 8, "batch_wait_timeout_s": 0.2}]}),
              name="metered", route_prefix="/")
    yield serve_url
    serve.delete("metered")


def caption(url: str, image: bytes = IMAGE) -> requests.Response:
    return requests.post(f"{url}/caption", files={"image": ("a.png", image, "image/png")}, timeout=120)


def test_a_scrape_counts_the_requests_tokens_and_batches(server):
    from openai import OpenAI
    from ray import serve

    port = metrics_port()
    before = scrape(port)
    with ThreadPoolExecutor(8) as pool:  # 8 at once: they share batches
        captions = [r.json() for r in pool.map(lambda _: caption(server), range(8))]
    client = OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe the image."}]}]
    streamed = [list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, stream=True,
                                                    stream_options={"include_usage": True})) for _ in range(2)]
    bad = caption(server, b"hello, I am text")
    unknown = requests.post(f"{server}/v1/chat/completions", json={"model": "nope", "messages": messages}, timeout=60)
    assert bad.status_code == 400 and unknown.status_code == 404
    generated = sum(c["num_tokens"] for c in captions) + sum(chunks[-1].usage.completion_tokens for chunks in streamed)
    stats = serve.get_deployment_handle(f"model-{MODEL}", "metered").stats.remote().result()
    assert stats["batched_requests"] == 8 and stats["batches"] < 8

    expected = {
        ("requests_total", (("model", MODEL), ("route", "/caption"), ("status", "200"), ("error", ""))): 8,
        ("requests_total", (("model", MODEL), ("route", "/v1/chat/completions"), ("status", "200"))): 2,
        ("requests_total", (("model", ""), ("route", "/caption"), ("status", "400"), ("error", "not_an_image"))): 1,
        ("requests_total", (("model", ""), ("route", "/v1/chat/completions"), ("status", "404"),
                            ("error", "model_not_found"))): 1,
        ("request_seconds_count", (("model", MODEL), ("route", "/caption"))): 8,
        ("ttft_seconds_count", (("model", MODEL),)): 10,  # the 8 batched ones (their step's first token) and 2
        ("tokens_total", (("model", MODEL), ("kind", "generated"))): generated,
        ("batch_size_count", (("model", MODEL),)): stats["batches"],
        ("images_total", (("outcome", "decoded"),)): 10,
        ("images_total", (("outcome", "refused"), ("reason", "not_an_image"))): 1,
    }

    def grown():
        after = scrape(port)
        added = since(before, after)
        seen = {(name, labels): total(added, f"ray_pixelray_serve_{name}", **dict(labels))
                for name, labels in expected}
        return after if seen == expected else None

    after = wait_until(grown, 60, "the series to count the requests")
    assert total(after, "ray_pixelray_serve_tokens_total", model=MODEL, kind="prompt") > 10 * 64  # the image tokens
    assert total(after, "ray_pixelray_serve_queue_length", model=MODEL) == 0  # nothing left waiting


def test_every_series_is_declared_once_and_charted():
    import json

    names = [s.name for s in telemetry.ALL]
    assert len(names) == len(set(names))
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "cluster/monitoring/grafana-dashboard.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for series in telemetry.ALL:
        assert any(name in queries for name in telemetry.exported(series)), f"{series.name} is not charted"
