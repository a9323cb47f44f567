"""The LM Studio hybrid's library parts: feature extractor, summaries and templates, and the
OpenAI-compatible client against servers on 127.0.0.1 that fail in the ways real ones do."""

from __future__ import annotations

import json
import time

import pytest
import torch

from pixelray.hybrid import (FeatureSummarizer, HybridConfig, HybridPixelLLM, LLMServerError, LMStudioClient,
                             LMStudioConfig, PromptTemplate, VisionFeatureExtractor, check_lm_studio_available)
from pixelray.testing import free_port
from pixelray.testing.images import random_images
from pixelray.testing.llm_servers import FailingLLM

# --- the feature extractor --------------------------------------------------------------------


def test_extractor_features_batches_and_save_round_trip(tiny_clip, tmp_path):
    extractor = VisionFeatureExtractor(str(tiny_clip), device="cpu")
    images = random_images(5)
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
    images = random_images(2)
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


@pytest.mark.parametrize("mode,status,match", [("500", 502, "HTTP 500"), ("no_choices", 502, "without choices"),
                                               ("invalid_json", 502, "not JSON"), ("slow", 503, "did not answer")])
def test_client_errors_and_bounded_retries(mode, status, match):
    server = FailingLLM(mode)
    try:
        client = LMStudioClient(LMStudioConfig(base_url=server.url, model="m", max_retries=2,
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
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert not check_lm_studio_available(LMStudioConfig(base_url=url))
    client = LMStudioClient(LMStudioConfig(base_url=url, max_retries=1))
    with pytest.raises(LLMServerError, match="cannot be reached") as err:
        client.models()
    assert err.value.status == 503



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


# --- answers too big, of the wrong shape, or asking to wait an hour --------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode,match", [("usage_not_object", "usage: Input should be a valid dictionary"),
                                        ("choices_not_list", "choices: Input should be a valid list"),
                                        ("not_an_object", "JSON that is not what /chat/completions returns"),
                                        ("huge", "declares 9,437,2"),
                                        ("huge_unsized", "over 8,388,608 bytes")])
def test_malformed_or_oversized_answers_are_502(mode, match):
    """Valid JSON of another shape, or a body over 8 MiB (declared or not), is the LLM server's fault:
    a 502 LLMServerError (not a TypeError or KeyError, which a gateway would answer with a 500), not
    worth a retry, and the body is not read past the limit."""
    server = FailingLLM(mode)
    try:
        client = LMStudioClient(LMStudioConfig(base_url=server.url, model="m", max_retries=2, timeout=10))
        with pytest.raises(LLMServerError, match=match) as err:
            client.complete([{"role": "user", "content": "hi"}])
        assert (err.value.status, err.value.transient, server.requests) == (502, False, 1)
    finally:
        server.shutdown()


@pytest.mark.timeout(30)  # today's SDK alone sleeps 100 s twice for `Retry-After: 100`
@pytest.mark.parametrize("retry_after", ["100", "3600", "Fri, 31 Dec 2100 23:59:59 GMT", "inf"])
def test_retry_after_waits_are_capped(retry_after):
    """HTTP 429 with a long Retry-After: each retry waits at most `max_retry_wait`, so the call ends in
    about max_retries x max_retry_wait seconds, having tried max_retries + 1 times; the failure is
    transient (a batch job's --resume tries the item again)."""
    server = FailingLLM("retry_after", retry_after=retry_after)
    try:
        client = LMStudioClient(LMStudioConfig(base_url=server.url, model="m", max_retries=2, max_retry_wait=0.5))
        began = time.monotonic()
        with pytest.raises(LLMServerError, match="HTTP 429") as err:
            client.complete([{"role": "user", "content": "hi"}])
        took = time.monotonic() - began
        assert (err.value.status, err.value.transient, server.requests) == (502, True, 3)
        assert 0.9 < took < 5, took
    finally:
        server.shutdown()


def test_transient_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(LLMServerError("down", 503, transient=True)))
    assert (err.status, err.code, err.transient) == (503, "llm_server_error", True)
