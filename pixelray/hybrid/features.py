"""The hybrid's vision half: patch features from any registered encoder or a saved checkpoint.

    extractor = VisionFeatureExtractor("clip")                     # a registry name, folder or hub id
    extractor = VisionFeatureExtractor("runs/encoder/vision_encoder.pt")  # {"vision_encoder", "config"}
    features = extractor.extract_features(images)                  # [batch, num_patches, dim]
    features = extractor.extract_features_batch(many_images, batch_size=32)
    extractor.save_pretrained("runs/encoder")                      # writes vision_encoder.pt

A checkpoint is a torch file holding `vision_encoder` (the encoder's state dict) and `config`
(`{"encoder": ...}`: the architecture, as a registry name, folder or hub id or as a saved spec). A
checkpoint without `config` takes the architecture from the `config` argument. The architecture is
built with random weights (nothing downloaded) and the checkpoint's weights must cover it exactly:
missing or unexpected keys are an error that names them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from pixelray.encoders import Encoder, EncoderSpec, architecture_spec, create_encoder, resolve_encoder

CHECKPOINT = "vision_encoder.pt"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class ExtractorConfig(BaseModel):
    """What a checkpoint's weights belong to: `encoder`, a registry name, folder or hub id (the
    weights of that source are not loaded), or a full `EncoderSpec` as `save_pretrained` writes it."""

    model_config = ConfigDict(extra="forbid")

    encoder: str | dict[str, Any]


class VisionFeatureExtractor:
    def __init__(self, model: str | Path = "clip", device: str = "auto", config: dict[str, Any] | None = None,
                 dtype: str = "fp32"):
        path = Path(model).expanduser()
        if path.is_dir() and (path / CHECKPOINT).is_file():
            path = path / CHECKPOINT
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            self.encoder = _from_checkpoint(path, config, device, dtype)
        else:
            if config is not None:
                raise ValueError(f"`config` describes a checkpoint's architecture; {model!r} is not a checkpoint "
                                 f"file ({', '.join(CHECKPOINT_SUFFIXES)}) or a folder holding {CHECKPOINT}")
            self.encoder = create_encoder(str(model), device=device, dtype=dtype)
        self.name = str(model)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def extract_features(self, images: list[Image.Image] | Image.Image, normalize: bool = True) -> torch.Tensor:
        """Patch features [batch, num_patches, dim] (float32, on CPU), L2-normalised per patch by default."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise ValueError("no images given")
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.encoder.encode(self.encoder.preprocess(rgb), normalize=normalize).patches.float().cpu()

    def extract_features_batch(self, images: list[Image.Image], batch_size: int = 32,
                               normalize: bool = True) -> torch.Tensor:
        """`extract_features` over many images, `batch_size` at a time: [len(images), num_patches, dim]."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        return torch.cat([self.extract_features(images[i:i + batch_size], normalize)
                          for i in range(0, len(images), batch_size)])

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write DIR/vision_encoder.pt: the weights and the architecture, loadable offline."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = architecture_spec(self.encoder.spec)
        state = {k: v.detach().cpu() for k, v in self.encoder.model.state_dict().items()}
        torch.save({"vision_encoder": state, "config": {"encoder": spec.model_dump()}}, directory / CHECKPOINT)
        return directory / CHECKPOINT


def _from_checkpoint(path: Path, config: dict[str, Any] | None, device: str, dtype: str) -> Encoder:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "vision_encoder" not in checkpoint:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a vision encoder checkpoint: it needs a 'vision_encoder' state dict "
                         f"(found {found})")
    if checkpoint.get("config") is None and config is None:
        raise ValueError(f"{path} holds no 'config'; pass config={{'encoder': NAME}} with its architecture")
    settings = ExtractorConfig.model_validate(config if config is not None else checkpoint["config"])
    spec = (EncoderSpec.model_validate(settings.encoder) if isinstance(settings.encoder, dict)
            else resolve_encoder(settings.encoder))
    encoder = create_encoder(architecture_spec(spec), device=device, dtype=dtype)
    missing, unexpected = encoder.model.load_state_dict(checkpoint["vision_encoder"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the {spec.name} architecture: "
                         f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}")
    return encoder


def _few(keys: list[str], n: int = 8) -> str:
    return "none" if not keys else ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
