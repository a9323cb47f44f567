"""The `text` backend: a text-only causal LM (Qwen2.5, Llama, ...) behind the generator interface.

Served by the Serve app, it is the LLM half of a hybrid running inside pixelray itself: the hybrid
model's `url` points at the app's own /v1. Conversations with images are refused (ValueError).
"""

from __future__ import annotations

import torch
from PIL import Image

from pixelray.generators.base import GenerationConfig, GenerationResult, Message, check_batch, count_images, literal_text
from pixelray.generators.hf import PretrainedGenerator


class TextGenerator(PretrainedGenerator):
    def __init__(self, source: str, device: str = "auto", dtype: str = "auto", quantization: str | None = None,
                 name: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(AutoModelForCausalLM, AutoTokenizer, source, device, dtype, quantization, name)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{source}: the tokenizer has no chat template; use an instruct/chat model")

    def prompts(self, conversations: list[list[Message]]) -> list[str]:
        """Chat-templated prompts; list contents (OpenAI text parts) are joined to plain strings."""
        for i, c in enumerate(conversations):
            if count_images(c):
                raise ValueError(f"{self.name} is a text-only model; conversation {i} has images")
        plain = [[{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                   "".join(p.get("text", "") for p in m["content"])} for m in c]
                 for c in literal_text(conversations, self.tokenizer)]
        return [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in plain]

    @torch.inference_mode()
    def chat_batch(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult]:
        check_batch(conversations, images)
        inputs = self.tokenizer(self.prompts(conversations), padding=True, add_special_tokens=False,
                                return_tensors="pt").to(self.device)
        return self._generate(dict(inputs), config, streamer)
