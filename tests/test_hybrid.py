"""The LM Studio hybrid: feature extractor, summaries and templates, the OpenAI-compatible client
against real servers on 127.0.0.1 (pixelray's own /v1 serving a tiny text LLM, and test servers
that fail in the ways real ones do), the hybrid generator in `pixelray caption` and in Serve."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelray.hybrid import (FeatureSummarizer, HybridConfig, HybridPixelLLM, LLMServerError, LMStudioClient,
                             LMStudioConfig, PromptTemplate, VisionFeatureExtractor, check_lm_studio_available)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the feature extractor --------------------------------------------------------------------


def test_extractor_features_batches_and_save_round_trip(tiny_clip, tmp_path):
    extractor = VisionFeatureExtractor(str(tiny_clip), device="cpu")
    images = _images(5)
    features = extractor.extract_features(images)
    assert features.shape == (5, 16, 64)  # 32 px / 8 px patches, ViT width 64
    assert torch.allclose(features.norm(dim=-1), torch.ones(5, 16), atol=1e-5)
    raw = extractor.extract_features(images, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(5, 16), atol=1e-2)
    assert torch.allclose(extractor.extract_features_batch(images, batch_size=2), features, atol=1e-5)
    with pytest.raises(ValueError, match="no images"):
        extractor.extract_features([])

    saved = extractor.save_pretrained(tmp_path / "enc")
    assert saved.name == "vision_encoder.pt"
    for source in (tmp_path / "enc", saved):  # the folder or the file
        again = VisionFeatureExtractor(str(source), device="cpu")
        assert torch.equal(again.extract_features(images), features)


def test_extractor_checkpoint_formats_and_errors(tiny_dinov2, tmp_path):
    reference = VisionFeatureExtractor(str(tiny_dinov2), device="cpu")
    images = _images(2)
    state = reference.encoder.model.state_dict()

    bare = tmp_path / "bare.pt"  # weights only: the architecture comes from `config`
    torch.save({"vision_encoder": state}, bare)
    with pytest.raises(ValueError, match="holds no 'config'"):
        VisionFeatureExtractor(str(bare), device="cpu")
    loaded = VisionFeatureExtractor(str(bare), device="cpu", config={"encoder": str(tiny_dinov2)})
    assert torch.equal(loaded.extract_features(images), reference.extract_features(images))

    partial = tmp_path / "partial.pth"
    dropped = sorted(state)[:2]
    torch.save({"vision_encoder": {k: v for k, v in state.items() if k not in dropped},
                "config": {"encoder": str(tiny_dinov2)}}, partial)
    with pytest.raises(ValueError, match="missing keys") as err:
        VisionFeatureExtractor(str(partial), device="cpu")
    assert all(k in str(err.value) for k in dropped)

    wrong = tmp_path / "wrong.pt"
    torch.save({"model": state}, wrong)
    with pytest.raises(ValueError, match="needs a 'vision_encoder' state dict"):
        VisionFeatureExtractor(str(wrong), device="cpu")
    with pytest.raises(ValueError, match="not a checkpoint"):
        VisionFeatureExtractor(str(tiny_dinov2), device="cpu", config={"encoder": "clip"})


# --- summaries and templates -------------------------------------------------------------------


def test_summary_keeps_the_salient_patches_and_their_place():
    features = torch.zeros(16, 32)
    features[5, :8] = 4.0  # row 1, column 1 of a 4x4 grid: in the top left third
    features[15] = -3.0  # the bottom right corner
    summary = FeatureSummarizer(num_samples=2, dims=4).summarize(features)
    assert summary.num_patches == 16 and len(summary.feature_mean) == 4
    assert [s["at"] for s in summary.sample_features] == ["top left", "bottom right"]
    assert summary.sample_features[0]["feature"] == [4.0, 0.0, 0.0, 0.0]  # channels 0-7 pooled
    parsed = json.loads(summary.visual_summary)
    assert parsed["patches"] == 16 and parsed["grid"] == "4x4" and len(parsed["salient"]) == 2
    assert len(summary.visual_summary) < 400
    with pytest.raises(ValueError, match="one image's features"):
        FeatureSummarizer().summarize(torch.zeros(2, 3, 4))


def test_templates_are_checked_when_made():
    summary = FeatureSummarizer().summarize(torch.randn(9, 16))
    custom = PromptTemplate("{num_patches} patches, mean {feature_mean}. {prompt}")
    assert custom.render(summary, "Caption it.") == f"9 patches, mean {json.dumps(summary.feature_mean, separators=(',', ':'))}. Caption it."
    no_prompt = PromptTemplate("Features: {visual_summary}")
    assert no_prompt.render(summary, "Caption it.").endswith("\n\nCaption it.")
    assert summary.visual_summary in PromptTemplate("caption").render(summary, "x")
    for bad, message in [("{visual_summary} {colour}", "unknown placeholders colour"),
                         ("{} and {visual_summary}", "positional"),
                         ("Describe: {prompt}", "none of the feature placeholders"),
                         ("{visual_summary", "bad prompt template")]:
        with pytest.raises(ValueError, match=message):
            PromptTemplate(bad)
    with pytest.raises(ValueError, match="unknown placeholders"):
        HybridPixelLLM({"template": "{oops} {visual_summary}"})  # before any model loads or request goes


def test_hybrid_source_strings():
    config = HybridConfig.from_source("/models/enc?url=http://10.0.0.2:1234/v1/&model=qwen&template=detailed"
                                      "&max_retries=5&max_concurrency=3")
    assert (config.encoder, config.template) == ("/models/enc", "detailed")
    assert (config.llm.base_url, config.llm.model, config.llm.max_retries, config.llm.max_concurrency) == \
        ("http://10.0.0.2:1234/v1", "qwen", 5, 3)
    assert HybridConfig.from_source("").llm.base_url == "http://localhost:1234/v1"
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        HybridConfig.from_source("clip?colour=red")
    with pytest.raises(ValueError, match="unknown setting 'api_key'"):  # secrets come from the environment
        HybridConfig.from_source("clip?api_key=abc")
    with pytest.raises(ValueError, match="http"):
        HybridConfig.from_source("clip?url=ftp://x")


# --- servers that fail ---------------------------------------------------------------------------


class FailingLLM(ThreadingHTTPServer):
    """An OpenAI-shaped server on 127.0.0.1 that fails on purpose: `mode` 500, no_choices,
    invalid_json or slow; it counts the requests it gets."""

    def __init__(self, mode: str):
        self.mode, self.requests = mode, 0
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up waiting: that is the point of "slow"
            pass

    def do_GET(self):
        self._send(200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode())

    def do_POST(self):
        self.server.requests += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.server.mode
        if mode == "slow":
            time.sleep(1.0)
        if mode == "500":
            self._send(500, b'{"error": "model crashed"}')
        elif mode == "no_choices":
            self._send(200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode())
        else:
            self._send(200, b"<html>not json</html>")


@pytest.mark.parametrize("mode,status,match", [("500", 502, "HTTP 500"), ("no_choices", 502, "without choices"),
                                               ("invalid_json", 502, "not JSON"), ("slow", 503, "did not answer")])
def test_client_errors_and_bounded_retries(mode, status, match):
    server = FailingLLM(mode)
    try:
        client = LMStudioClient(LMStudioConfig(base_url=server.url, model="m", max_retries=2, retry_delay=0.01,
                                               timeout=0.3))
        with pytest.raises(LLMServerError, match=match) as err:
            client.complete([{"role": "user", "content": "hi"}])
        assert err.value.status == status
        # 5xx and timeouts are retried (twice), answers that are merely wrong are not
        expected = 3 if mode in ("500", "slow") else 1
        deadline = time.monotonic() + 3
        while server.requests < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.requests == expected
    finally:
        server.shutdown()


def test_unreachable_server():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    assert not check_lm_studio_available(LMStudioConfig(base_url=url))
    client = LMStudioClient(LMStudioConfig(base_url=url, max_retries=1, retry_delay=0.01))
    with pytest.raises(LLMServerError, match="cannot be reached") as err:
        client.models()
    assert err.value.status == 503


# --- against pixelray's own /v1 serving a tiny text LLM ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_text_llm(tmp_path_factory) -> Path:
    from tiny_vlms import save_tiny_text_llm

    return save_tiny_text_llm(tmp_path_factory.mktemp("tiny-text-llm"))


@pytest.fixture(scope="module")
def garbage_llm():
    server = FailingLLM("no_choices")
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def llm_app(ray_address, tiny_text_llm, tiny_clip, garbage_llm):
    """One Serve app on 127.0.0.1: the tiny text LLM (`tiny-llm`), a hybrid whose LLM is that model
    through the app's own /v1, and hybrids whose LLM server is down or answers garbage."""
    from ray import serve

    from serve_apps.vlm import build_app

    port = _free_port()
    v1 = f"http://127.0.0.1:{port}/v1"
    hybrid = f"hybrid:{tiny_clip}?url={v1}&model=tiny-llm&max_retries=1&retry_delay=0.05"
    small = {"device": "cpu", "num_cpus": 0.1, "max_new_tokens": 16}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [
        {"name": "tiny-llm", "source": str(tiny_text_llm), **small},
        {"name": "hybrid", "source": hybrid, **small},
        {"name": "hybrid-down", "source": f"hybrid:{tiny_clip}?url=http://127.0.0.1:{_free_port()}/v1&model=m"
                                          "&max_retries=1&retry_delay=0.05", **small},
        {"name": "hybrid-garbage", "source": f"hybrid:{tiny_clip}?url={garbage_llm.url}&max_retries=1", **small},
    ]}), name="hybrid", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "v1": v1, "hybrid": hybrid}
    serve.shutdown()


def _hybrid(tiny_clip, v1: str, **llm) -> HybridPixelLLM:
    return HybridPixelLLM({"encoder": str(tiny_clip), "device": "cpu",
                           "llm": {"base_url": v1, "model": "tiny-llm", "temperature": 0, "max_tokens": 8, **llm}})


def test_hybrid_sends_the_summary_prompt_to_the_llm(llm_app, tiny_clip, tiny_text_llm):
    from transformers import AutoTokenizer

    hybrid = _hybrid(tiny_clip, llm_app["v1"])
    assert check_lm_studio_available(hybrid.config.llm)
    assert hybrid.client.models() == ["tiny-llm", "hybrid", "hybrid-down", "hybrid-garbage"]
    images = _images(4)
    captions = hybrid.generate_batch(images)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert hybrid.generate(images[0]) == captions[0]  # temperature 0: the same request, the same answer

    # what the LLM must have been sent, built here from the parts: encoder -> summary -> template
    features = VisionFeatureExtractor(str(tiny_clip), device="cpu").extract_features(images[0])[0]
    prompt = PromptTemplate("caption").render(FeatureSummarizer().summarize(features), "Describe the image.")
    direct = LMStudioClient(hybrid.config.llm).complete([{"role": "user", "content": prompt}])
    assert direct.text == captions[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_llm)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=False)
    assert direct.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"]) > 100
    from pixelray.hybrid import generate_caption_with_lm_studio

    assert generate_caption_with_lm_studio(features, config=hybrid.config.llm) == captions[0]
    hybrid.close()


def test_generate_batch_logs_and_returns_none_for_failures(llm_app, tiny_clip, caplog):
    down = HybridPixelLLM({"encoder": str(tiny_clip), "device": "cpu",
                           "llm": {"base_url": f"http://127.0.0.1:{_free_port()}/v1", "model": "m",
                                   "max_retries": 1, "retry_delay": 0.01}})
    with caplog.at_level("WARNING", logger="pixelray.hybrid.model"):
        assert down.generate_batch(_images(3)) == [None, None, None]
    assert sum("cannot be reached" in r.message for r in caplog.records) == 3
    with pytest.raises(LLMServerError, match="cannot be reached"):
        down.generate(_images(1)[0])


def _post_image(url: str, route: str, **fields):
    import io

    import requests

    buffer = io.BytesIO()
    _images(1)[0].save(buffer, format="PNG")
    return requests.post(f"{url}{route}", files={"image": ("a.png", buffer.getvalue(), "image/png")}, data=fields,
                         timeout=60)


def test_hybrid_endpoint_and_v1_model(llm_app):
    import base64
    import io

    import requests

    r = _post_image(llm_app["url"], "/hybrid", max_new_tokens=6)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "hybrid" and isinstance(r.json()["caption"], str) and r.json()["num_tokens"] <= 6
    buffer = io.BytesIO()
    _images(1)[0].save(buffer, format="PNG")
    url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
    completion = requests.post(f"{llm_app['v1']}/chat/completions", timeout=60, json={
        "model": "hybrid", "max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]})
    assert completion.status_code == 200, completion.text
    body = completion.json()
    assert isinstance(body["choices"][0]["message"]["content"], str) and body["usage"]["prompt_tokens"] > 100

    streamed = requests.post(f"{llm_app['v1']}/chat/completions", timeout=60, stream=True, json={
        "model": "hybrid", "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]})
    events = [line[6:] for line in streamed.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == \
        body["choices"][0]["message"]["content"]  # the whole reply in one piece: the LLM server is not streamed

    refused = _post_image(llm_app["url"], "/hybrid", model="tiny-llm", max_new_tokens=6)
    assert refused.status_code == 404 and "cannot serve this route" in refused.json()["error"]["message"]
    down = _post_image(llm_app["url"], "/hybrid", model="hybrid-down", max_new_tokens=6)
    assert down.status_code == 503 and "cannot be reached" in down.json()["error"]["message"]
    garbage = _post_image(llm_app["url"], "/hybrid", model="hybrid-garbage", max_new_tokens=6)
    assert garbage.status_code == 502 and "without choices" in garbage.json()["error"]["message"]
    text_only = requests.post(f"{llm_app['v1']}/chat/completions", timeout=60, json={
        "model": "tiny-llm", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]})
    assert text_only.status_code == 400 and "text-only" in text_only.json()["error"]["message"]


def test_caption_job_with_the_hybrid(llm_app, tiny_clip, tmp_path):
    import pyarrow.parquet as pq

    from pipelines.caption import CaptionConfig, run_caption

    images = Path(__file__).resolve().parents[1] / "examples" / "shapes" / "images"
    result = run_caption(CaptionConfig(input=str(images), out=str(tmp_path / "ok"), model=llm_app["hybrid"],
                                       max_tokens=8, batch_size=4))
    rows = sorted(pq.read_table(tmp_path / "ok" / "captions").to_pylist(), key=lambda r: r["path"])
    assert (result.written, result.errors, len(rows)) == (8, 0, 8)
    hybrid = _hybrid(tiny_clip, llm_app["v1"])  # the same captions as the library gives, image by image
    expected = hybrid.generate_batch([Image.open(r["path"]).convert("RGB") for r in rows])
    assert [r["caption"] for r in rows] == expected

    down = f"hybrid:{tiny_clip}?url=http://127.0.0.1:{_free_port()}/v1&model=m&max_retries=1&retry_delay=0.01"
    result = run_caption(CaptionConfig(input=str(images), out=str(tmp_path / "down"), model=down, batch_size=4))
    errors = pq.read_table(tmp_path / "down" / "errors").to_pylist()
    assert (result.written, result.errors, len(errors)) == (0, 8, 8)
    assert all(e["error_type"] == "generation" and "cannot be reached" in e["error"] for e in errors)


# --- against mlx_vlm.server, and a server stopped mid-batch ----------------------------------------


@pytest.mark.slow
def test_mlx_vlm_server_and_a_server_killed_mid_batch(ray_address, tiny_clip, tmp_path):
    """The hybrid's LLM is `python -m mlx_vlm.server` (mlx-vlm's CPU build) serving a tiny local
    Qwen2-VL; then a caption job runs against it and the server is killed after a few answers: the
    answered images keep their captions, the rest become error rows, and the job ends normally."""
    import os
    import signal
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from image_files import write_folder
    from pipelines.caption import CaptionConfig, run_caption
    from tiny_mlx import save_in_subprocess

    model = save_in_subprocess(tmp_path / "mlx-model")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = tmp_path / "mlx-server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_vlm.server", "--host", "127.0.0.1", "--port", str(port),
                                 "--model", str(model)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not check_lm_studio_available(LMStudioConfig(base_url=url), timeout=2):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        hybrid = HybridPixelLLM({"encoder": str(tiny_clip), "device": "cpu",
                                 "llm": {"base_url": url, "temperature": 0, "max_tokens": 8}})
        assert hybrid.client.model() == str(model)  # no model named: the one the server lists
        captions = hybrid.generate_batch(_images(3))
        assert all(isinstance(c, str) for c in captions), captions
        hybrid.close()

        folder = tmp_path / "imgs"
        write_folder(folder, 24, bad=False)
        source = f"hybrid:{tiny_clip}?url={url}&max_concurrency=1&max_retries=1&retry_delay=0.05&timeout=20"
        killed = threading.Event()

        def kill_after_three_answers():  # the job runs in this test's thread; this one only watches the log
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and log.read_text().count("POST /v1/chat/completions") < 3 + 3:
                time.sleep(0.05)  # (3 requests came from generate_batch above)
            os.killpg(proc.pid, signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_after_three_answers, daemon=True).start()
        # one generator actor: the Serve app of the tests above still holds some of the 2 CPUs
        result = run_caption(CaptionConfig(input=str(folder), out=str(tmp_path / "out"), model=source, max_tokens=48,
                                           batch_size=4, num_generators=1))
        assert killed.wait(timeout=5), "the job ended before the server was killed"
        proc.wait(timeout=30)
        rows = pq.read_table(tmp_path / "out" / "captions").num_rows
        errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
        # the third answer may be cut off by the kill (the server logs a request as its answer starts)
        assert rows >= 2 and errors and rows + len(errors) == 24
        assert (result.written, result.errors) == (rows, len(errors))
        assert all("cannot be reached" in e["error"] for e in errors), errors[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_registry_names(tiny_text_llm, tiny_clip):
    from pixelray.generators import create_generator, resolve_generator

    assert resolve_generator("hybrid").source == "clip?url=http://localhost:1234/v1"
    spec = resolve_generator(f"hybrid:{tiny_clip}?model=m")
    assert (spec.backend, spec.source) == ("hybrid", f"{tiny_clip}?model=m")
    assert resolve_generator("hybrid?model=m").source == "?model=m"
    assert resolve_generator(str(tiny_text_llm)).backend == "text"  # a causal LM folder without vision
    assert resolve_generator(f"text:{tiny_text_llm}").backend == "text"
    with pytest.raises(ValueError, match="hf and text backends"):
        create_generator(spec, quantization="4bit")
