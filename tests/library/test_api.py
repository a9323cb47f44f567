"""The library's front door, called as a user calls it from a notebook: `import pixelray`, a model made
by name, images in (PIL images or paths), text or features out. Text is asserted on the bundled
shapes-demo model (trained); the tiny random models of every other backend are checked for types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import pixelray
from pixelray.shapes import caption_correct
from pixelray.testing.images import random_images

SHAPES = Path(__file__).resolve().parents[2] / "examples" / "shapes"
CAPTIONS = [json.loads(line) for line in (SHAPES / "captions.jsonl").read_text().splitlines()]
QUESTIONS = [json.loads(line) for line in (SHAPES / "questions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes_demo():
    return pixelray.create_generator("shapes-demo", device="cpu")


def test_the_public_names_are_few_and_cheap_to_import():
    import subprocess
    import sys

    # `import pixelray` imports neither torch nor Ray: the names load on first use
    probe = "import sys, pixelray; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60).stdout.strip() == "[]"
    assert set(pixelray.__all__) >= {"create_encoder", "create_generator", "open_image", "GenerationConfig"}
    assert all(getattr(pixelray, name) is not None for name in pixelray.__all__)
    with pytest.raises(AttributeError):
        pixelray.no_such_name  # noqa: B018


def test_caption_and_answer_with_the_bundled_model(shapes_demo):
    paths = [SHAPES / c["image"] for c in CAPTIONS]
    captions = shapes_demo.caption_batch(paths)  # paths are opened and checked as the batch jobs do
    assert sum(caption_correct(text, c["shapes"]) for text, c in zip(captions, CAPTIONS)) >= len(CAPTIONS) - 1, captions
    assert shapes_demo.caption(Image.open(paths[2]).convert("RGB")) == captions[2]  # one image, the same text
    asked = [q for q in QUESTIONS if q["image"] == CAPTIONS[2]["image"]]
    answers = shapes_demo.answer_batch([SHAPES / q["image"] for q in asked], [q["question"] for q in asked],
                                       max_new_tokens=8)
    assert sum(a == q["answers"][0] for a, q in zip(answers, asked)) >= len(asked) - 1, (answers, asked)
    assert shapes_demo.answer(SHAPES / asked[0]["image"], asked[0]["question"]) == answers[0]


def test_chat_keeps_its_history_and_images(shapes_demo):
    history: list = []
    image = SHAPES / CAPTIONS[0]["image"]
    first = shapes_demo.chat("Describe the image.", image=image, history=history)
    assert caption_correct(first, CAPTIONS[0]["shapes"]), first
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert isinstance(history[0]["content"][0]["image"], Image.Image)  # the turn carries its image
    second = shapes_demo.chat("What colour is the star?", history=history, max_new_tokens=8)
    assert second == "yellow" and len(history) == 4
    # the same second turn, as the batch interface takes it: bare image parts, images beside them
    from pixelray.generators import GenerationConfig
    from pixelray.generators.base import split_images

    conversation, images = split_images(history[:3])
    assert [len(images), conversation[0]["content"][0]] == [1, {"type": "image"}]
    again = shapes_demo.chat_batch([conversation], [images], GenerationConfig(max_new_tokens=8))[0]
    assert again.text == second
    assert shapes_demo.chat("What is it?", image=image) == shapes_demo.chat("What is it?", image=image, history=[])
    with pytest.raises(ValueError, match="has no image"):
        shapes_demo.chat("And now?", history=[{"role": "user", "content": [{"type": "image"}]}])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "smolvlm", "paligemma", "pixelray"])
def test_every_family_speaks_the_same_api(tiny_vlm_dirs, family):
    model = pixelray.create_generator(str(tiny_vlm_dirs[family]), device="cpu")
    images = random_images(2)
    captions = model.caption_batch(images, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert model.caption(images[0], max_new_tokens=4) == captions[0]  # greedy: one alone as in the batch
    assert isinstance(model.answer(images[1], "What is it?", max_new_tokens=3), str)
    history: list = []
    model.chat("What is it?", image=images[0], history=history, max_new_tokens=3)
    assert isinstance(model.chat("And then?", history=history, max_new_tokens=3), str) and len(history) == 4


def test_a_text_model_chats_without_images(tiny_text_llm):
    model = pixelray.create_generator(str(tiny_text_llm), device="cpu")
    history: list = []
    assert isinstance(model.chat("Hello", history=history, max_new_tokens=4), str) and len(history) == 2
    with pytest.raises(ValueError, match="text-only"):
        model.caption(random_images(1)[0])


def test_encoder_maps_images_to_features(tiny_clip, tmp_path):
    encoder = pixelray.create_encoder(str(tiny_clip), device="cpu")
    images = random_images(3)
    out = encoder(images)
    assert out.embedding.shape == (3, 32) and out.patches.shape == (3, 16, 64)  # 32 px / 8 px patches, width 64
    images[1].save(tmp_path / "one.png")
    alone = encoder(tmp_path / "one.png")  # one image, by path
    assert alone.embedding.shape == (1, 32)
    assert torch.allclose(alone.embedding[0], encoder(images[1]).embedding[0], atol=1e-5)
    with pytest.raises(pixelray.ImageError, match="cannot read"):
        encoder(tmp_path / "missing.png")
