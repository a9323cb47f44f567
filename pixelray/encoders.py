"""Vision encoder registry.

    spec = resolve_encoder("clip")              # or "dinov2-small", "default", a directory, a hub id
    encoder = create_encoder(spec, device="auto", normalize=True)
    out = encoder(images)                       # PIL images, paths or URIs (or one of them)
    out.embedding  # [batch, dim]            pooled embedding
    out.patches    # [batch, num_patches, d] patch features
    out = encoder.encode(encoder.preprocess(pil_images))   # the two steps, as the batch job runs them
    create_encoder("shapes-clip", text=True).encode_text(["a red star"])   # [1, dim], the images' space

Names are data (`REGISTRY`); any name may also be a local directory (an open_clip
folder with open_clip_config.json, a transformers folder with config.json, or a
pixelray model folder, whose vision tower is the encoder) or a hub id (`org/name`
for transformers, `hf-hub:org/name` for open_clip).
Weights are loaded by each library's own loading code (open_clip pretrained
tags, `from_pretrained`), so nothing here downloads by itself: offline, a
model that is not in the local cache fails with a message saying how to get it.

`EncoderSpec.preprocessor()` builds only the preprocessing (no weights), so the
batch pipeline can resize and normalise in CPU tasks while the model runs in
GPU actors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from pixelray.device import resolve_device, resolve_dtype
from pixelray.hub import not_available
from pixelray.images import ImageInput, as_image

Backend = Literal["open_clip", "hf", "pixelray"]


class EncoderSpec(BaseModel):
    """Everything needed to build an encoder's preprocessing and its model, on any node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    backend: Backend
    source: str  # open_clip model name (may carry local-dir:/hf-hub:), a transformers id/dir, or a pixelray model dir
    pretrained: str | None = None  # open_clip pretrained tag
    # build the architecture from this config with random weights instead of loading `source`:
    # a transformers config (with model_type) or an open_clip model config (embed_dim, vision_cfg, ...)
    random_config: dict[str, Any] | None = None
    preprocess: dict[str, Any] | None = None  # resolved open_clip preprocess config, or a transformers image processor's
    description: str = ""

    @property
    def has_text(self) -> bool:
        """Whether the model has a text tower embedding text in its images' space (open_clip's CLIPs)."""
        return self.backend == "open_clip"

    def preprocessor(self) -> Callable[[list[Image.Image]], np.ndarray]:
        """Images -> float32 array [batch, 3, H, W], without loading any weights."""
        if self.backend in ("open_clip", "pixelray"):
            transform = open_clip_transform(self.preprocess)
            return lambda images: torch.stack([transform(im) for im in images]).numpy()
        processor = _hf_image_processor(self)
        return lambda images: np.asarray(
            processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32
        )


# --- the registry -------------------------------------------------------------------------

CLIP_ARCHS = {  # registry name -> (open_clip architecture, default pretrained tag)
    "clip-vit-b-32": ("ViT-B-32", "openai"),
    "clip-vit-b-16": ("ViT-B-16", "openai"),
    "clip-vit-l-14": ("ViT-L-14", "openai"),
    "clip-vit-l-14-336": ("ViT-L-14-336", "openai"),
}
DINOV2_SIZES = ("small", "base", "large", "giant")
DEFAULT_VIT = dict(  # the `default` encoder: a randomly initialised ViT for debugging pipelines
    model_type="vit", hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
    intermediate_size=3072, image_size=224, patch_size=16, add_pooling_layer=False,
)

REGISTRY: dict[str, dict[str, Any]] = {
    "clip": dict(alias="clip-vit-b-32"),
    **{
        name: dict(backend="open_clip", source=arch, pretrained=tag,
                   description=f"open_clip {arch} ({tag} weights); any tag via {name}:TAG")
        for name, (arch, tag) in CLIP_ARCHS.items()
    },
    "dinov2": dict(alias="dinov2-base"),
    **{
        f"dinov2-{size}": dict(backend="hf", source=f"facebook/dinov2-{size}",
                               description=f"DINOv2 ViT-{size[0].upper()} through transformers")
        for size in DINOV2_SIZES
    },
    "shapes-clip": dict(backend="open_clip", source=f"local-dir:{Path(__file__).resolve().parent / 'models' / 'shapes-clip'}",
                        description="bundled CLIP-style model of the shapes demo (a few MB, offline): images and "
                                    "texts such as 'a red star' in one space (train_jobs/configs/shapes_clip.yaml)"),
    "default": dict(backend="hf", source="", random_config=DEFAULT_VIT,
                    description="random ViT (4 layers, width 768, seed 0) for debugging; needs no download"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def list_encoders() -> dict[str, str]:
    """Registry name -> one-line description."""
    return {
        name: entry.get("description") or f"alias of {entry['alias']}" for name, entry in REGISTRY.items()
    }


def resolve_encoder(name: str | EncoderSpec) -> EncoderSpec:
    """Turn a registry name, local directory or hub id into an `EncoderSpec` (no weights loaded)."""
    if isinstance(name, EncoderSpec):
        return name
    base, _, tag = name.partition(":") if name.split(":", 1)[0] in REGISTRY else (name, "", "")
    if base in REGISTRY:
        entry = REGISTRY[base]
        if "alias" in entry:
            return resolve_encoder(entry["alias"] + (f":{tag}" if tag else ""))
        spec = dict(entry, name=name)
        if tag:
            if entry["backend"] != "open_clip":
                raise ValueError(f"encoder {base!r} takes no pretrained tag (got {tag!r})")
            spec["pretrained"] = tag
        return _finish(EncoderSpec(**spec))
    if name.startswith(("hf-hub:", "local-dir:")):
        return _finish(EncoderSpec(name=name, backend="open_clip", source=name))
    path = Path(name).expanduser()
    if path.is_dir():
        path = path.resolve()
        if (path / "open_clip_config.json").is_file():
            return _finish(EncoderSpec(name=name, backend="open_clip", source=f"local-dir:{path}"))
        if (path / "config.json").is_file():
            backend = "pixelray" if json.loads((path / "config.json").read_text()).get("model_type") == "pixelray" \
                else "hf"
            return _finish(EncoderSpec(name=name, backend=backend, source=str(path)))
        raise ValueError(
            f"directory {path} holds neither open_clip_config.json (open_clip) nor config.json (transformers)"
        )
    if _HUB_ID.match(name):
        return _finish(EncoderSpec(name=name, backend="hf", source=name))
    raise ValueError(
        f"unknown encoder {name!r}: use one of {', '.join(REGISTRY)}, a local model directory, "
        "a transformers hub id (org/name) or an open_clip hub id (hf-hub:org/name)"
    )


def _finish(spec: EncoderSpec) -> EncoderSpec:
    """Resolve what the preprocessing needs now, so a bad name fails before any image is read."""
    if spec.backend == "open_clip":
        return spec.model_copy(update={"preprocess": _open_clip_preprocess(spec)})
    if spec.backend == "pixelray":  # the model's own open_clip preprocessing (pixelray.vlm)
        config = json.loads((Path(spec.source) / "config.json").read_text())
        return spec.model_copy(update={"preprocess": open_clip_preprocess_cfg(config["vision_config"],
                                                                              config.get("vision_preprocess") or {})})
    _hf_image_processor(spec)  # validates that the processor can be loaded
    return spec


def _open_clip_preprocess(spec: EncoderSpec) -> dict[str, Any]:
    import open_clip

    if spec.source.startswith(("local-dir:", "hf-hub:")):
        saved = _open_clip_saved_config(spec.source)
        return open_clip_preprocess_cfg(saved["model_cfg"], saved.get("preprocess_cfg", {}))
    model_cfg = open_clip.get_model_config(spec.source)
    if model_cfg is None:
        raise ValueError(f"open_clip has no architecture {spec.source!r}")
    tag_cfg = {}
    if spec.pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(spec.source, spec.pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(spec.source)
            raise ValueError(
                f"open_clip {spec.source} has no pretrained tag {spec.pretrained!r}; known: {', '.join(tags)}"
            )
    return open_clip_preprocess_cfg(model_cfg, tag_cfg)


def open_clip_preprocess_cfg(model_cfg: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """open_clip's eval preprocessing for a model config: its defaults, the saved or pretrained-tag
    settings on top, and the vision tower's image size (as open_clip's factory does)."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(merge_preprocess_dict(PreprocessCfg(), {}), overlay)
    cfg["size"] = model_cfg["vision_cfg"]["image_size"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def open_clip_transform(preprocess: dict[str, Any]):
    """PIL image -> normalised tensor [3, H, W], by open_clip's own eval transform."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**preprocess), is_train=False)


def _open_clip_saved_config(source: str) -> dict[str, Any]:
    schema, ident = source.split(":", 1)
    if schema == "local-dir":
        return json.loads((Path(ident) / "open_clip_config.json").read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(ident, "open_clip_config.json")).read_text())
    except Exception as e:
        raise not_available(source, e) from None


def _hf_image_processor(spec: EncoderSpec):
    import transformers
    from transformers import AutoImageProcessor, ViTImageProcessor

    if spec.preprocess is not None:
        return getattr(transformers, spec.preprocess["image_processor_type"]).from_dict(spec.preprocess)
    if spec.random_config is not None:
        size = spec.random_config["image_size"]
        return ViTImageProcessor(size={"height": size, "width": size})
    try:
        return AutoImageProcessor.from_pretrained(spec.source)
    except Exception as e:
        raise not_available(spec.source, e) from None


# --- the encoders ---------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    embedding: torch.Tensor  # [batch, dim]
    patches: torch.Tensor  # [batch, num_patches, patch_dim]


class Encoder:
    """A loaded vision encoder: `encode(pixel_values)` -> pooled embedding and patch features; with a text
    tower (`create_encoder(..., text=True)`), `encode_text(texts)` -> embeddings in the same space."""

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype, normalize: bool):
        self.spec, self.model, self.device, self.dtype, self.normalize = spec, model, device, dtype, normalize
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self._preprocess = spec.preprocessor()

    @property
    def has_text(self) -> bool:
        return False

    def encode_text(self, texts: list[str], normalize: bool | None = None) -> torch.Tensor:
        """Texts -> embeddings [n, dim], in the space of the image embeddings."""
        raise ValueError(f"encoder {self.spec.name!r} has no text tower" if not self.spec.has_text
                         else f"encoder {self.spec.name!r} was loaded without its text tower (text=True)")

    def _normalized(self, x: torch.Tensor, normalize: bool | None) -> torch.Tensor:
        return torch.nn.functional.normalize(x.float(), dim=-1) if (
            self.normalize if normalize is None else normalize) else x

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(self._preprocess(images))

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor | np.ndarray, normalize: bool | None = None) -> EncoderOutput:
        """Pooled embedding and patch features; `normalize` (default: the encoder's) L2-normalises both."""
        pixels = torch.as_tensor(pixel_values).to(self.device, self.dtype, non_blocking=True)
        embedding, patches = self._forward(pixels)
        return EncoderOutput(embedding=self._normalized(embedding, normalize),
                             patches=self._normalized(patches, normalize))

    def __call__(self, images: ImageInput | list[ImageInput]) -> EncoderOutput:
        """Images (or one image; paths and URIs are opened) -> pooled embeddings [batch, dim] and patch
        features [batch, num_patches, patch_dim]."""
        images = images if isinstance(images, list) else [images]
        return self.encode(self.preprocess([as_image(im) for im in images]))

    def _forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class OpenClipEncoder(Encoder):
    """open_clip vision tower: pooled = projected image embedding, patches = ln_post tokens; with the
    whole CLIP loaded, its text tower and tokenizer embed text into the same space."""

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 normalize: bool):
        super().__init__(spec, model, device, dtype, normalize)
        self.visual = getattr(model, "visual", model)
        self.tokenizer = _open_clip_tokenizer(spec) if self.has_text else None

    @property
    def has_text(self) -> bool:
        return self.visual is not self.model

    @torch.inference_mode()
    def encode_text(self, texts: list[str], normalize: bool | None = None) -> torch.Tensor:
        if not self.has_text:
            return super().encode_text(texts, normalize)
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self._normalized(self.model.encode_text(tokens), normalize)

    def _forward(self, pixels):
        pooled, tokens = self.visual(pixels)
        return pooled, tokens


class HFEncoder(Encoder):
    """transformers vision backbone: pooled = CLS token, patches = tokens after CLS and registers."""

    def _forward(self, pixels):
        hidden = self.model(pixel_values=pixels).last_hidden_state
        prefix = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        return hidden[:, 0], hidden[:, prefix:]


def create_encoder(name: str | EncoderSpec, device: str = "auto", dtype: str = "fp32",
                   normalize: bool = False, text: bool = False) -> Encoder:
    """Load an encoder by registry name, directory, hub id or resolved spec; `text` keeps its text tower
    (an error for an encoder without one)."""
    spec = resolve_encoder(name)
    if text and not spec.has_text:
        raise ValueError(f"encoder {spec.name!r} has no text tower: text embeddings need a CLIP "
                         "(open_clip) encoder such as shapes-clip or clip")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if spec.backend == "open_clip":
        return OpenClipEncoder(spec, _load_open_clip(spec, text), dev, torch_dtype, normalize)
    if spec.backend == "pixelray":
        return OpenClipEncoder(spec, _load_pixelray_tower(spec), dev, torch_dtype, normalize)
    return HFEncoder(spec, _load_hf(spec), dev, torch_dtype, normalize)


def architecture_spec(spec: EncoderSpec) -> EncoderSpec:
    """The same encoder with random weights and its architecture written into the spec
    (`random_config`), so it builds anywhere, offline, ready for a checkpoint's weights."""
    if spec.random_config is not None:
        return spec
    if spec.backend == "pixelray":
        raise ValueError(f"encoder {spec.name!r} is a pixelray model's vision tower, read from its folder; it has no "
                         "architecture-only form (use an open_clip or transformers encoder here)")
    if spec.backend == "open_clip":
        if spec.source.startswith(("local-dir:", "hf-hub:")):
            config = _open_clip_saved_config(spec.source)["model_cfg"]
        else:
            import open_clip

            config = open_clip.get_model_config(spec.source)
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec.source).to_dict()
        except Exception as e:
            raise not_available(spec.source, e) from None
        spec = spec.model_copy(update={"preprocess": _hf_image_processor(spec).to_dict()})
    return spec.model_copy(update={"pretrained": None, "random_config": config})


def _load_open_clip(spec: EncoderSpec, text: bool = False) -> torch.nn.Module:
    """The vision tower, or with `text` the whole CLIP (its `visual` set to give tokens too)."""
    import open_clip

    if spec.random_config is not None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = open_clip.CLIP(**spec.random_config)
        model.visual.output_tokens = True
        return model if text else model.visual
    quick_gelu = False
    if spec.pretrained:
        quick_gelu = bool(open_clip.get_pretrained_cfg(spec.source, spec.pretrained).get("quick_gelu"))
    try:
        model = open_clip.create_model(spec.source, pretrained=spec.pretrained, force_quick_gelu=quick_gelu)
    except Exception as e:
        raise not_available(f"{spec.source} ({spec.pretrained or 'no tag'})", e) from None
    visual = model.visual
    if not hasattr(visual, "output_tokens"):
        raise ValueError(f"open_clip model {spec.source} has no token output (not a ViT); patches unsupported")
    visual.output_tokens = True
    return model if text else visual


def _load_pixelray_tower(spec: EncoderSpec) -> torch.nn.Module:
    """A pixelray model's vision tower (an open_clip ViT, pixelray.vlm), only its weights read from the folder."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from pixelray.vlm import vision_tower

    folder = Path(spec.source)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            state.update({k.removeprefix("vision."): f.get_tensor(k) for k in f.keys() if k.startswith("vision.")})
    tower = vision_tower(AutoConfig.from_pretrained(folder))
    tower.load_state_dict(state)
    return tower


def _open_clip_tokenizer(spec: EncoderSpec):
    """open_clip's own tokenizer for the model (its BPE ships in the wheel: nothing is downloaded)."""
    import open_clip

    if spec.random_config is not None:
        return open_clip.get_tokenizer("", context_length=spec.random_config["text_cfg"].get("context_length", 77))
    return open_clip.get_tokenizer(spec.source)


def _load_hf(spec: EncoderSpec) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    if spec.random_config is not None:
        cfg = dict(spec.random_config)
        # a model argument, not a config field (the `default` ViT has no pooler: patches are all it gives)
        pooling = {"add_pooling_layer": cfg.pop("add_pooling_layer")} if "add_pooling_layer" in cfg else {}
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # every actor must build the same weights
            return AutoModel.from_config(config, **pooling)
    try:
        return AutoModel.from_pretrained(spec.source)
    except Exception as e:
        raise not_available(spec.source, e) from None
