"""Generator registry and the `hf` backend on tiny random models of every family."""

from __future__ import annotations

import pytest

from pixelray.generators import (GenerationConfig, check_loadable, create_generator, list_generators, resolve_generator,
                                 user_turn)
from pixelray.hub import ModelNotAvailableError
from pixelray.testing.images import random_rgb

FAMILIES = ["llava", "qwen2_vl", "smolvlm", "paligemma", "pixelray"]
IMAGES = [random_rgb(50, 40, seed=1), random_rgb(64, 48, seed=2), random_rgb(33, 33, seed=3)]
PROMPTS = ["Describe the image.", "What color is the car in this photo, please?", "Caption"]


@pytest.fixture(scope="module")
def generators(tiny_vlm_dirs):
    return {f: create_generator(str(tiny_vlm_dirs[f]), device="cpu") for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_at_a_time_under_greedy(generators, family):
    gen = generators[family]
    cfg = GenerationConfig(max_new_tokens=6)
    batched = gen.generate(IMAGES, PROMPTS, cfg)
    single = [gen.generate([im], [p], cfg)[0] for im, p in zip(IMAGES, PROMPTS)]
    assert [(r.text, r.num_tokens) for r in batched] == [(r.text, r.num_tokens) for r in single]
    for r in batched:
        assert 0 <= r.num_tokens <= 6 and r.finish_reason in ("stop", "length")
        assert r.finish_reason == "stop" or r.num_tokens == 6


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "smolvlm", "pixelray"])
def test_multi_turn_chat(generators, family):
    gen = generators[family]
    first = [user_turn("What is in the image?")]
    history = first + [{"role": "assistant", "content": [{"type": "text", "text": "A car."}]},
                       user_turn("And its color?", with_image=False)]
    prompts = gen.prompts([first, history])
    assert "A car." in prompts[1] and prompts[1].startswith(prompts[0].rsplit("\n", 2)[0][:10])
    replies = gen.chat_batch([first, history], [[IMAGES[0]], [IMAGES[1]]], GenerationConfig(max_new_tokens=4))
    assert len(replies) == 2 and all(r.num_tokens <= 4 for r in replies)


def test_stop_strings_cut_the_text(generators):
    gen = generators["llava"]
    full = gen.generate(IMAGES[:1], "Describe the image.", GenerationConfig(max_new_tokens=12))[0]
    assert len(full.text) >= 6, full.text
    stop = full.text[3:5]
    cut = gen.generate(IMAGES[:1], "Describe the image.", GenerationConfig(max_new_tokens=12, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and len(cut.text) < len(full.text)


def test_sampling_is_reproducible_with_a_seed(generators):
    gen = generators["qwen2_vl"]
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert gen.generate(IMAGES[:2], "Caption", cfg) == gen.generate(IMAGES[:2], "Caption", cfg)


def test_quantization_needs_cuda(tiny_llava):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="needs CUDA"):
        create_generator(str(tiny_llava), device="cpu", quantization="4bit")


def test_names_and_offline_errors(tiny_llava, tmp_path):
    assert resolve_generator("smolvlm-256m").source == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert resolve_generator(f"hf:{tiny_llava}").source == str(tiny_llava)
    assert resolve_generator(str(tiny_llava)).backend == "hf"
    with pytest.raises(ValueError, match="is for the hf and text backends"):
        create_generator(resolve_generator(f"pixelray:{tiny_llava}"), quantization="4bit")
    with pytest.raises(ValueError, match="unknown model"):
        resolve_generator("not a model")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_generator(str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="huggingface-cli download Qwen/Qwen2-VL-2B-Instruct"):
        check_loadable(resolve_generator("qwen2-vl-2b"))
    check_loadable(resolve_generator(str(tiny_llava)))


def test_models_list_says_what_is_cached(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # a hub cache holding SmolVLM-256M only, laid out as huggingface_hub writes it
    repo = tmp_path / "models--HuggingFaceTB--SmolVLM-256M-Instruct"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    listed = list_generators()
    assert {"llava-1.5-7b", "llava-v1.6-mistral-7b", "smolvlm", "smolvlm-256m", "qwen2-vl-2b",
            "qwen2.5-vl-3b", "paligemma-3b"} <= set(listed)
    # the bundled model is always there; the cached weights serve both engines
    assert {name for name, (_, _, where) in listed.items() if where == "offline"} == {
        "smolvlm-256m", "smolvlm-256m-vllm", "shapes-demo"}
    assert listed["hybrid"][2] == "server"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_scaled_to_its_fit_looks_the_same_to_the_model(generators, family):
    """What /chat keeps of an image (ImageFit) is what the model's preprocessing makes of the original."""
    import numpy as np
    from PIL import Image

    gen = generators[family]
    ramp = np.linspace(0, 255, 1200)
    image = Image.fromarray(np.stack([np.add.outer(ramp[:800] / 2, ramp / 2), np.add.outer(ramp[:800], 0 * ramp),
                                      np.add.outer(0 * ramp[:800], ramp)], -1).clip(0, 255).astype(np.uint8))
    small = gen.image_fit.apply(image)
    assert small.width * small.height < image.width * image.height / 4

    def pixels(im):
        if family == "pixelray":
            return gen.transform(im).numpy()
        return gen.processor.image_processor(images=[im], return_tensors="np")["pixel_values"]

    original, fitted = pixels(image), pixels(small)
    assert original.shape == fitted.shape and np.abs(original - fitted).max() < 0.05
