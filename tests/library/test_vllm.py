"""The `vllm` backend (vLLM's CPU build here) against the `hf` backend on the same tiny Qwen2-VL: the
same prompts, the same greedy tokens; its settings, stop strings, seeds, and inputs the engine refuses."""

from __future__ import annotations

import pytest

from pixelray.generators import GenerationConfig, check_loadable, create_generator, resolve_generator, user_turn
from pixelray.generators.vllm import VLLMOptions
from pixelray.testing.images import random_rgb
from pixelray.testing.tiny_vlms import save_tiny_llava, save_tiny_paligemma, save_tiny_smolvlm

pytest.importorskip("vllm")

IMAGES = [random_rgb(50, 40, seed=1), random_rgb(64, 48, seed=2), random_rgb(33, 33, seed=3),
          random_rgb(40, 56, seed=4)]
PROMPTS = ["Describe the image.", "What color is the car in this photo, please?", "Caption", "What is this?"]
# a 448x448 image is 256 tokens at this processor setting: more than the context holds
BUILDERS = {"llava": lambda out, hidden: save_tiny_llava(out, width=hidden), "smolvlm": save_tiny_smolvlm,
            "paligemma": save_tiny_paligemma}
SETTINGS = "max_model_len=256&max_images=2&mm.max_pixels=200704&kv_cache_gib=0.25"


@pytest.mark.parametrize("family", ["llava", "smolvlm", "paligemma"])
def test_each_family_gives_the_hf_backends_greedy_tokens(family, tmp_path):
    """The families vLLM serves besides Qwen2-VL (below), saved by transformers 5 as `pixelray train` saves them
    (LLaVA's and PaliGemma's vision towers are renamed for vLLM's loader), with heads of 64."""
    folder = BUILDERS[family](tmp_path / family, hidden=128)
    config = GenerationConfig(max_new_tokens=12)
    expected = create_generator(f"hf:{folder}", device="cpu", dtype="fp32").generate(IMAGES, PROMPTS, config)
    vllm = create_generator(f"vllm:{folder}?max_model_len=256&kv_cache_gib=0.25", dtype="fp32")
    try:
        assert vllm.generate(IMAGES, PROMPTS, config) == expected
    finally:
        vllm.close()


@pytest.fixture(scope="module")
def engines(tiny_qwen2_vl_h128):
    hf = create_generator(f"hf:{tiny_qwen2_vl_h128}", device="cpu", dtype="fp32")
    vllm = create_generator(f"vllm:{tiny_qwen2_vl_h128}?{SETTINGS}", dtype="fp32")
    yield hf, vllm
    vllm.close()


def test_options_from_the_model_name():
    model, options = VLLMOptions.from_source("/m/qwen?max_images=4&mm.max_pixels=1003520&tensor_parallel_size=2")
    assert model == "/m/qwen" and options.max_images == 4 and options.tensor_parallel_size == 2
    args = options.engine_args(model, "bf16", cpu=False)
    assert args["mm_processor_kwargs"] == {"max_pixels": 1003520} and args["limit_mm_per_prompt"] == {"image": 4}
    assert args["dtype"] == "bfloat16" and args["distributed_executor_backend"] == "mp"
    with pytest.raises(ValueError, match="unknown setting 'max_imgs'"):
        VLLMOptions.from_source("/m/qwen?max_imgs=4")
    assert resolve_generator("qwen2-vl-2b-vllm").backend == "vllm"
    assert resolve_generator("qwen2-vl-2b-vllm").source == resolve_generator("qwen2-vl-2b").source
    with pytest.raises(ValueError, match="unknown setting"):
        check_loadable(resolve_generator("vllm:/m/qwen?colour=red"))


def test_greedy_tokens_equal_the_hf_backends(engines):
    hf, vllm = engines
    config = GenerationConfig(max_new_tokens=24)
    expected, got = hf.generate(IMAGES, PROMPTS, config), vllm.generate(IMAGES, PROMPTS, config)
    assert got == expected  # text, token count, finish reason and prompt tokens, item for item
    assert {r.finish_reason for r in expected} == {"stop", "length"}  # both endings are compared

    first = [user_turn("What is in the image?")]
    history = first + [{"role": "assistant", "content": [{"type": "text", "text": "A car."}]},
                       user_turn("And this one?")]
    pairs = ([first, history], [[IMAGES[0]], [IMAGES[0], IMAGES[1]]])
    assert vllm.chat_batch(*pairs, config) == hf.chat_batch(*pairs, config)


def test_stop_strings_and_seeds(engines):
    hf, vllm = engines
    image, prompt, full = max(zip(IMAGES, PROMPTS, vllm.generate(IMAGES, PROMPTS, GenerationConfig(max_new_tokens=24))),
                              key=lambda x: len(x[2].text))
    stop = full.text[3:5]
    cut = vllm.generate([image], prompt, GenerationConfig(max_new_tokens=24, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert cut.text == hf.generate([image], prompt, GenerationConfig(max_new_tokens=24, stop=[stop]))[0].text

    sampled = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert vllm.generate(IMAGES, "Caption", sampled) == vllm.generate(IMAGES, "Caption", sampled)
    other = vllm.generate(IMAGES, "Caption", sampled.model_copy(update={"seed": 8}))
    assert other != vllm.generate(IMAGES, "Caption", sampled)


def test_an_input_the_engine_refuses_fails_only_itself(engines):
    _, vllm = engines
    big = random_rgb(448, 448, seed=5)
    conversations = [[user_turn("Caption")] for _ in range(3)]
    outcomes = vllm.chat_items(conversations, [[IMAGES[0]], [big], [IMAGES[1]]], GenerationConfig(max_new_tokens=8))
    assert isinstance(outcomes[1], ValueError) and "longer than the maximum model length" in str(outcomes[1])
    assert outcomes[0] == vllm.generate([IMAGES[0]], "Caption", GenerationConfig(max_new_tokens=8))[0]
    assert outcomes[2] == vllm.generate([IMAGES[1]], "Caption", GenerationConfig(max_new_tokens=8))[0]
    three = [[user_turn("Caption"), user_turn("More", with_image=True), user_turn("Again", with_image=True)]]
    with pytest.raises(ValueError, match="image"):  # over the model's max_images=2
        vllm.chat_batch(three, [[IMAGES[0]] * 3])
