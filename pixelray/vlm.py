"""The project's own LLaVA-style model: CLIP vision tower + MLP projector + a causal LM (Qwen2).

    image -> open_clip ViT (patch tokens, projected to the CLIP embedding width, e.g. 512)
          -> projector: Linear(512, 896) - GELU - Linear(896, 896)
          -> in place of the <image> tokens of the prompt -> Qwen2 (e.g. Qwen2.5-0.5B, width 896)

It is a transformers `PreTrainedModel`, so `save_pretrained` / `from_pretrained` write and read a
folder (config.json with model_type "pixelray", model.safetensors) with the tokenizer beside it.
The vision tower is described by an open_clip model config and built by open_clip; the language
model by its own transformers config. Training it is `train_jobs/`'s business; here it loads,
embeds images into the prompt and generates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

IMAGE_TOKEN = "<image>"


class PixelRayConfig(PretrainedConfig):
    model_type = "pixelray"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, vision_config: dict[str, Any] | None = None, vision_preprocess: dict[str, Any] | None = None,
                 text_config: dict[str, Any] | PretrainedConfig | None = None, image_token_id: int | None = None,
                 vision_stem: list[int] | None = None, **kwargs):
        # vision_config: an open_clip model config ({"embed_dim", "vision_cfg", "text_cfg", ...})
        self.vision_config = vision_config or {}
        # vision_stem: channels of the ConvStem that replaces the ViT's patch embedding (None: keep it)
        self.vision_stem = list(vision_stem) if vision_stem else None
        self.vision_preprocess = vision_preprocess or {}
        if isinstance(text_config, dict):
            from transformers import CONFIG_MAPPING

            text_config = CONFIG_MAPPING[text_config.get("model_type", "qwen2")](**text_config)
        self.text_config = text_config
        self.image_token_id = image_token_id
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Patch tokens per image: (image_size / patch_size) ** 2."""
        vision = self.vision_config["vision_cfg"]
        return (vision["image_size"] // vision["patch_size"]) ** 2


class ConvStem(nn.Sequential):
    """A convolutional patch embedding for a ViT trained from scratch: 3x3 stride-2 convolutions
    (BatchNorm, GELU), then a 1x1 convolution to the ViT width. Len(channels) halvings make one token
    per `patch_size` pixels, like the strided patch convolution it replaces, but with the locality
    bias that lets a small ViT learn shapes from far fewer images (Xiao et al. 2021, "Early
    convolutions help transformers see better")."""

    def __init__(self, channels: list[int], width: int, patch_size: int):
        if 2 ** len(channels) != patch_size:
            raise ValueError(f"vision_stem {channels}: {len(channels)} stride-2 convolutions make "
                             f"{2 ** len(channels)} px tokens, but the ViT's patch_size is {patch_size}")
        layers, previous = [], 3
        for c in channels:
            layers += [nn.Conv2d(previous, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.GELU()]
            previous = c
        super().__init__(*layers, nn.Conv2d(previous, width, 1))


def vision_tower(config: PixelRayConfig) -> nn.Module:
    """The model's vision tower, with random weights: open_clip's ViT of `config.vision_config` (its text half is
    built, then dropped) giving patch tokens, with the ConvStem of `config.vision_stem` when there is one."""
    import open_clip

    tower = open_clip.CLIP(**config.vision_config).visual
    tower.output_tokens = True
    if config.vision_stem:
        vision = config.vision_config["vision_cfg"]
        tower.conv1 = ConvStem(config.vision_stem, vision["width"], vision["patch_size"])
    return tower


class PixelRayForConditionalGeneration(PreTrainedModel):
    config_class = PixelRayConfig
    base_model_prefix = "pixelray"
    main_input_name = "input_ids"
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config: PixelRayConfig):
        super().__init__(config)
        self.vision = vision_tower(config)
        vision_dim = config.vision_config["embed_dim"]
        width = config.text_config.hidden_size
        self.projector = nn.Sequential(nn.Linear(vision_dim, width), nn.GELU(), nn.Linear(width, width))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and any(module is m for m in self.projector):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute activations in the backward pass instead of keeping them: the language model's layers
        (transformers' checkpointing) and the vision tower's blocks (open_clip's)."""
        self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs)
        self.vision.set_grad_checkpointing(True)

    def image_features(self, pixel_values: torch.Tensor | None = None,
                       vision_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[images, 3, H, W] pixels, or the vision tower's patch tokens [images, num_patches, width] as
        `pixelray embed --patches` stores them -> [images, num_patches, LM width]."""
        dtype = next(self.projector.parameters()).dtype
        if vision_tokens is None:
            _, vision_tokens = self.vision(pixel_values.to(dtype))
        tokens = vision_tokens.to(dtype)
        if self.vision.proj is not None:
            tokens = tokens @ self.vision.proj  # to the CLIP embedding width (512 for ViT-B/32)
        return self.projector(tokens)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              vision_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's projected patches written over its <image> tokens."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if (pixel_values is None or not len(pixel_values)) and vision_tokens is None:
            return embeds
        features = self.image_features(pixel_values, vision_tokens).to(embeds.dtype)
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"{int(slots.sum())} image tokens in the prompts but {features.shape[0]} images of "
                             f"{features.shape[1]} patches each")
        return embeds.masked_scatter(slots.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                vision_tokens: torch.Tensor | None = None, **kwargs):
        """`vision_tokens` (stored patch features) in place of `pixel_values` skip the vision tower."""
        return self.language_model(inputs_embeds=self.embed(input_ids, pixel_values, vision_tokens),
                                   attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """New tokens only (the prompt goes in as embeddings)."""
        return self.language_model.generate(inputs_embeds=self.embed(input_ids, pixel_values),
                                            attention_mask=attention_mask, **kwargs)


AutoConfig.register("pixelray", PixelRayConfig, exist_ok=True)
