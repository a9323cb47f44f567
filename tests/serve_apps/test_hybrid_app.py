"""The hybrid against a real OpenAI-compatible server, pixelray's own /v1 serving a tiny text LLM:
the library's HybridPixelLLM, the /hybrid endpoint and hybrid models in /v1."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import pixelray
from pixelray.hybrid import (FeatureSummarizer, HybridPixelLLM, LLMServerError, LMStudioClient, PromptTemplate,
                             VisionFeatureExtractor, check_lm_studio_available, generate_caption_with_lm_studio)
from pixelray.testing import free_port
from pixelray.testing.images import random_images
from pixelray.testing.llm_servers import FailingLLM


@pytest.fixture(scope="module")
def garbage_llm():
    server = FailingLLM("no_choices")
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def llm_app(serve_url, tiny_text_llm, tiny_clip, garbage_llm):
    """One Serve app on 127.0.0.1: the tiny text LLM (`tiny-llm`), a hybrid whose LLM is that model
    through the app's own /v1, and hybrids whose LLM server is down or answers garbage."""
    from ray import serve

    from pixelray.serve_apps.vlm import build_app

    v1 = f"{serve_url}/v1"
    hybrid = f"hybrid:{tiny_clip}?url={v1}&model=tiny-llm&max_retries=1"
    small = {"device": "cpu", "num_cpus": 0.1, "max_new_tokens": 16}
    serve.run(build_app({"models": [
        {"name": "tiny-llm", "source": str(tiny_text_llm), **small},
        {"name": "hybrid", "source": hybrid, **small},
        {"name": "hybrid-down", "source": f"hybrid:{tiny_clip}?url=http://127.0.0.1:{free_port()}/v1&model=m"
                                          "&max_retries=1", **small},
        {"name": "hybrid-garbage", "source": f"hybrid:{tiny_clip}?url={garbage_llm.url}&max_retries=1", **small},
    ]}), name="hybrid", route_prefix="/")
    yield {"url": serve_url, "v1": v1, "hybrid": hybrid}
    serve.delete("hybrid")


def _hybrid(tiny_clip, v1: str, **llm) -> HybridPixelLLM:
    return HybridPixelLLM({"encoder": str(tiny_clip), "device": "cpu",
                           "llm": {"base_url": v1, "model": "tiny-llm", "temperature": 0, "max_tokens": 8, **llm}})



def test_hybrid_sends_the_summary_prompt_to_the_llm(llm_app, tiny_clip, tiny_text_llm):
    hybrid = _hybrid(tiny_clip, llm_app["v1"])
    assert check_lm_studio_available(hybrid.config.llm)
    assert hybrid.client.models() == ["tiny-llm", "hybrid", "hybrid-down", "hybrid-garbage"]
    images = random_images(4)
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

    assert generate_caption_with_lm_studio(features, config=hybrid.config.llm) == captions[0]
    hybrid.close()
    # the Python API over the hybrid backend: the same request, so the same caption
    model = pixelray.create_generator(f"hybrid:{tiny_clip}?url={llm_app['v1']}&model=tiny-llm", device="cpu")
    assert model.caption(images[0], max_new_tokens=8) == captions[0]


def test_generate_batch_logs_and_returns_none_for_failures(llm_app, tiny_clip, caplog):
    down = HybridPixelLLM({"encoder": str(tiny_clip), "device": "cpu",
                           "llm": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "m",
                                   "max_retries": 1}})
    with caplog.at_level("WARNING", logger="pixelray.hybrid.model"):
        assert down.generate_batch(random_images(3)) == [None, None, None]
    assert sum("cannot be reached" in r.message for r in caplog.records) == 3
    with pytest.raises(LLMServerError, match="cannot be reached"):
        down.generate(random_images(1)[0])


def _post_image(url: str, route: str, **fields):
    import io

    import requests

    buffer = io.BytesIO()
    random_images(1)[0].save(buffer, format="PNG")
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
    random_images(1)[0].save(buffer, format="PNG")
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



def test_hybrid_route_502_for_answers_of_the_wrong_shape_or_size(llm_app, garbage_llm):
    """Through /hybrid over real HTTP: an LLM server that answers valid JSON of another shape, or a body
    over 8 MiB, is a 502 with a JSON error body that says what was wrong (not a 500)."""
    try:
        for mode, match in [("choices_not_list", "choices: Input should be a valid list"),
                            ("usage_not_object", "usage: Input should be a valid dictionary"),
                            ("not_an_object", "JSON that is not what /chat/completions returns"),
                            ("huge_unsized", "over 8,388,608 bytes")]:
            garbage_llm.mode = mode
            r = _post_image(llm_app["url"], "/hybrid", model="hybrid-garbage", max_new_tokens=6)
            assert r.status_code == 502, (mode, r.status_code, r.text)
            assert r.json()["error"]["type"] == "server_error" and match in r.json()["error"]["message"], r.text
    finally:
        garbage_llm.mode = "no_choices"
