"""The MLX backend on a tiny mlx-vlm model (mlx's CPU build runs it on Linux)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelray.generators import GenerationConfig, create_generator, resolve_generator
from pixelray.generators.streaming import stream_reply

ROOT = Path(__file__).resolve().parents[2]


def _image(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_mlx_backend_chat_stream_and_limits(ray_address, tiny_mlx):
    """In a Ray worker that exits after it (max_calls=1): importing mlx_vlm changes transformers'
    Qwen2-VL processors in its process, which the hf backend's tests must not see."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module
    ray.get(ray.remote(max_calls=1, num_cpus=0.5)(_backend_checks).remote(tiny_mlx))


def _backend_checks(tiny_mlx: Path) -> None:
    spec = resolve_generator(f"mlx:{tiny_mlx}")
    assert (spec.backend, spec.source) == ("mlx", str(tiny_mlx))
    gen = create_generator(spec, device="cpu")
    config = GenerationConfig(max_new_tokens=6)
    results = gen.generate([_image(), _image(seed=1)], ["Describe the image.", "What is it?"], config)
    assert len(results) == 2 and all(isinstance(r.text, str) and 1 <= r.num_tokens <= 6 for r in results)
    assert all(r.prompt_tokens > 4 for r in results)  # the prompt, the image tokens included
    again = gen.generate([_image()], "Describe the image.", config)[0]
    assert again.text == results[0].text  # greedy: the same prompt gives the same reply
    text_only = gen.chat_batch([[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]], [[]], config)[0]
    assert text_only.prompt_tokens < results[0].prompt_tokens
    # the Python API over this backend: the same calls, the same greedy replies
    assert gen.caption(_image(), max_new_tokens=6) == results[0].text
    assert gen.answer_batch([_image(seed=1)], ["What is it?"], max_new_tokens=6) == [results[1].text]
    history: list = []
    assert gen.chat("Describe the image.", image=_image(), history=history, max_new_tokens=6) == results[0].text
    assert isinstance(gen.chat("And?", history=history, max_new_tokens=4), str) and len(history) == 4
    pieces = list(stream_reply(gen, [{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": "Describe the image."}]}],
                               [_image()], config))
    assert pieces[-1].text == results[0].text and "".join(pieces[:-1]) == results[0].text
    # images are fitted between the limits before the model's processor, aspect kept, RGB
    assert gen.fit(Image.new("L", (4000, 1000))).size == (1024, 256)
    assert gen.fit(Image.new("RGBA", (10, 20))).mode == "RGB" and gen.fit(Image.new("RGB", (10, 20))).size == (28, 56)
    small = create_generator(f"mlx:{tiny_mlx}?max_image_size=64&min_image_size=32", device="cpu")
    assert small.fit(Image.new("RGB", (400, 100))).size == (128, 32)  # the minimum wins over the maximum
    assert small.fit(Image.new("RGB", (300, 200))).size == (64, 43)
    with pytest.raises(ValueError, match="unknown settings"):
        create_generator(f"mlx:{tiny_mlx}?max_size=9", device="cpu")
    with pytest.raises(ValueError, match="image parts"):
        gen.chat_batch([[{"role": "user", "content": "x"}]], [[_image()]], config)
