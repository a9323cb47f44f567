"""Encoder registry: names, tiny models loaded through the real loading code, shapes and pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelray.encoders import REGISTRY, create_encoder, list_encoders, resolve_encoder
from pixelray.errors import PixelrayError
from pixelray.hub import ModelNotAvailableError
from pixelray.testing.images import random_rgb

IMAGES = [random_rgb(50, 30, seed=1), random_rgb(20, 64, seed=2), random_rgb(33, 33, seed=3)]


@pytest.mark.parametrize("name,arch,size", [
    ("clip", "ViT-B-32", 224), ("clip-vit-b-32", "ViT-B-32", 224), ("clip-vit-b-16", "ViT-B-16", 224),
    ("clip-vit-l-14", "ViT-L-14", 224), ("clip-vit-l-14-336", "ViT-L-14-336", 336),
])
def test_clip_names_resolve_to_open_clip_architectures(name, arch, size):
    spec = resolve_encoder(name)
    assert (spec.backend, spec.source, spec.pretrained) == ("open_clip", arch, "openai")
    assert spec.preprocess["size"] == size
    assert spec.preprocess["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_clip_pretrained_tag_can_be_chosen_and_is_checked():
    spec = resolve_encoder("clip-vit-b-16:laion2b_s34b_b88k")
    assert spec.pretrained == "laion2b_s34b_b88k"
    assert resolve_encoder("clip:laion2b_s34b_b79k").source == "ViT-B-32"
    with pytest.raises(ValueError, match="no pretrained tag 'nope'.*openai"):
        resolve_encoder("clip-vit-b-32:nope")
    with pytest.raises(ValueError, match="takes no pretrained tag"):
        resolve_encoder("default:openai")


def test_registry_lists_every_family():
    names = list_encoders()
    for n in ("clip", "dinov2", "default", *(f"dinov2-{s}" for s in ("small", "base", "large", "giant"))):
        assert n in names and n in REGISTRY
    assert names["dinov2"] == "alias of dinov2-base"


def test_dinov2_offline_says_how_to_get_it():
    with pytest.raises(ModelNotAvailableError, match="huggingface-cli download facebook/dinov2-small"):
        resolve_encoder("dinov2-small")


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder 'no such thing'.*clip"):
        resolve_encoder("no such thing")
    with pytest.raises(ValueError, match="neither open_clip_config.json"):
        resolve_encoder(str(tmp_path))


def test_tiny_open_clip_from_local_dir(tiny_clip):
    import open_clip

    enc = create_encoder(str(tiny_clip), device="cpu")
    assert enc.spec.backend == "open_clip" and enc.spec.source == f"local-dir:{tiny_clip}"
    out = enc(IMAGES)
    assert out.embedding.shape == (3, 32) and out.patches.shape == (3, 16, 64)
    # the pooled embedding is open_clip's own image embedding of the same loaded weights
    reference = open_clip.create_model(f"local-dir:{tiny_clip}").eval()
    with torch.no_grad():
        expected = reference.encode_image(enc.preprocess(IMAGES))
    torch.testing.assert_close(out.embedding, expected, rtol=1e-4, atol=1e-5)


def test_normalize_gives_unit_vectors(tiny_clip):
    out = create_encoder(str(tiny_clip), normalize=True)(IMAGES)
    torch.testing.assert_close(out.embedding.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.patches.norm(dim=-1), torch.ones(3, 16))


@pytest.mark.parametrize("fixture,prefix", [("tiny_dinov2", 1), ("tiny_dinov2_registers", 3)])
def test_tiny_dinov2_from_local_dir(request, fixture, prefix):
    from transformers import AutoModel

    path = request.getfixturevalue(fixture)
    enc = create_encoder(str(path))
    out = enc(IMAGES)
    assert out.embedding.shape == (3, 32) and out.patches.shape == (3, 16, 32)
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(path)(pixel_values=enc.preprocess(IMAGES)).last_hidden_state
    torch.testing.assert_close(out.embedding, hidden[:, 0])  # CLS
    torch.testing.assert_close(out.patches, hidden[:, prefix:])  # registers are not patches


def test_default_encoder_is_a_deterministic_random_vit():
    a, b = create_encoder("default"), create_encoder("default")
    cfg = a.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (4, 768)
    pixels = a.preprocess(IMAGES[:2])
    assert pixels.shape == (2, 3, 224, 224)
    out = a.encode(pixels)
    assert out.embedding.shape == (2, 768) and out.patches.shape == (2, 196, 768)
    torch.testing.assert_close(out.embedding, b.encode(pixels).embedding)  # same on every actor


def test_saved_default_reloads_as_a_directory(tmp_path):
    enc = create_encoder("default")
    enc.model.save_pretrained(tmp_path)
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(tmp_path)
    again = create_encoder(str(tmp_path))
    pixels = enc.preprocess(IMAGES[:1])
    torch.testing.assert_close(again.encode(pixels).embedding, enc.encode(pixels).embedding)


def test_preprocessor_needs_no_weights(tiny_clip, tiny_dinov2):
    for path in (tiny_clip, tiny_dinov2):
        spec = resolve_encoder(str(path))
        arr = spec.preprocessor()(IMAGES)
        assert arr.dtype == np.float32 and arr.shape == (3, 3, 32, 32)
        np.testing.assert_allclose(arr, create_encoder(spec).preprocess(IMAGES).numpy())


def test_device_and_dtype_errors(tiny_clip):
    if not torch.cuda.is_available():
        with pytest.raises(PixelrayError, match="CUDA is not available"):
            create_encoder(str(tiny_clip), device="cuda")
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        create_encoder(str(tiny_clip), device="cpu", dtype="fp16")
    out = create_encoder(str(tiny_clip), device="cpu", dtype="bf16")(IMAGES)
    assert out.embedding.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_clip):
    cpu = create_encoder(str(tiny_clip), device="cpu")(IMAGES).embedding
    gpu = create_encoder(str(tiny_clip), device="cuda")(IMAGES).embedding.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
