"""The `pixelray` backend: the project's own CLIP + projector + Qwen2 model (pixelray.vlm)."""

from __future__ import annotations

import torch
from PIL import Image

from pixelray.device import resolve_device, resolve_dtype
from pixelray.encoders import open_clip_preprocess_cfg, open_clip_transform
from pixelray.generators.base import (GenerationConfig, GenerationResult, Generator, Message, check_batch,
                                      context_length, decode_results, decoding_kwargs, end_and_pad_ids,
                                      literal_text, within_context)
from pixelray.hub import not_available
from pixelray.images import ImageFit

# Used when the saved tokenizer carries no chat template of its own (Qwen2 style).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% elif 'text' in c %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class PixelRayGenerator(Generator):
    def __init__(self, source: str, device: str = "auto", dtype: str = "auto", name: str | None = None):
        from transformers import AutoTokenizer

        from pixelray.vlm import IMAGE_TOKEN, PixelRayForConditionalGeneration

        self.name = name or source
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.model = PixelRayForConditionalGeneration.from_pretrained(source, dtype=self.dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:
            raise not_available(source, e) from None
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = CHAT_TEMPLATE
        config = self.model.config
        preprocess = open_clip_preprocess_cfg(config.vision_config, config.vision_preprocess)
        self.transform = open_clip_transform(preprocess)
        side = preprocess["size"] if isinstance(preprocess["size"], int) else max(preprocess["size"])
        # open_clip resizes the shorter side to `size` and crops (or squashes), or with "longest" fits the longer
        self.image_fit = ImageFit(long_side=side) if preprocess.get("resize_mode") == "longest" else \
            ImageFit(short_side=side)
        self.image_token, self.image_tokens = IMAGE_TOKEN, IMAGE_TOKEN * config.num_image_tokens
        self.end_ids, self.pad_id = end_and_pad_ids(self.model.language_model.generation_config, self.tokenizer)
        self.context = context_length(self.model.language_model.config)

    def prompts(self, conversations: list[list[Message]]) -> list[str]:
        """Chat-templated prompts, each <image> expanded to one token per patch."""
        return [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                .replace(self.image_token, self.image_tokens) for c in literal_text(conversations, self.tokenizer)]

    @torch.inference_mode()
    def chat_batch(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult]:
        check_batch(conversations, images)
        enc = self.tokenizer(self.prompts(conversations), padding=True, return_tensors="pt").to(self.device)
        config = within_context(enc["input_ids"].shape[1], config, self.context)
        flat = [im for ims in images for im in ims]
        pixels = torch.stack([self.transform(im) for im in flat]).to(self.device, self.dtype) if flat else None
        out = self.model.generate(enc["input_ids"], pixels, enc["attention_mask"],
                                  streamer=streamer,
                                  **decoding_kwargs(config, self.pad_id, self.tokenizer))
        return decode_results(out, enc["attention_mask"], self.tokenizer, self.end_ids, self.pad_id, config)
