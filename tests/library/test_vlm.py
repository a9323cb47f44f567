"""The project's own model: save/load round trip, image tokens, and the pixelray backend."""

from __future__ import annotations

import pytest
import torch

from pixelray.generators import GenerationConfig, create_generator, resolve_generator
from pixelray.testing.images import random_rgb
from pixelray.vlm import PixelRayForConditionalGeneration


def test_round_trip_and_registry_dispatch(tiny_vlm_dirs, tmp_path):
    path = tiny_vlm_dirs["pixelray"]
    assert resolve_generator(str(path)).backend == "pixelray"
    model = PixelRayForConditionalGeneration.from_pretrained(path).eval()
    cfg = model.config
    assert cfg.num_image_tokens == 16 and model.projector[0].in_features == cfg.vision_config["embed_dim"]
    assert model.language_model.lm_head.weight.data_ptr() == model.language_model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[5, 6] + [cfg.image_token_id] * 16 + [7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(ids, pixels).logits
        model.save_pretrained(tmp_path)
        after = PixelRayForConditionalGeneration.from_pretrained(tmp_path).eval()(ids, pixels).logits
        other_image = model(ids, torch.randn(1, 3, 32, 32)).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not torch.allclose(other_image[0, -1], before[0, -1])  # the image reaches the language model
    with pytest.raises(ValueError, match="16 image tokens in the prompts but 2 images"):
        model(ids, torch.randn(2, 3, 32, 32))


def test_conv_stem_round_trip(tiny_vlm_dirs, tmp_path):
    from pixelray.vlm import ConvStem, PixelRayConfig

    config = PixelRayConfig.from_pretrained(tiny_vlm_dirs["pixelray"], vision_stem=[4, 8, 8])
    model = PixelRayForConditionalGeneration(config)
    assert isinstance(model.vision.conv1, ConvStem)
    ids = torch.tensor([[5] + [config.image_token_id] * 16 + [7]])
    model.train()(ids.repeat(4, 1), torch.randn(4, 3, 32, 32))  # moves the BatchNorm statistics
    model.eval().save_pretrained(tmp_path)
    loaded = PixelRayForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_stem == [4, 8, 8]
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixels).logits, model(ids, pixels).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="patch_size is 8"):
        PixelRayForConditionalGeneration(PixelRayConfig.from_pretrained(tiny_vlm_dirs["pixelray"], vision_stem=[4, 8]))


def test_backend_generates_in_batches(tiny_vlm_dirs):
    gen = create_generator(str(tiny_vlm_dirs["pixelray"]), device="cpu")
    prompt = gen.prompts([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]])[0]
    assert prompt.count("<image>") == 16 and prompt.endswith("<|im_start|>assistant\n")
    images = [random_rgb(seed=i) for i in range(3)]
    cfg = GenerationConfig(max_new_tokens=5)
    batched = gen.generate(images, ["Describe.", "What is the colour of the shape?", "Caption"], cfg)
    assert all(r.num_tokens <= 5 for r in batched)
    assert batched[0] == gen.generate(images[:1], ["Describe."], cfg)[0]
