"""The `hf` backend: any transformers image-text-to-text model, by hub id or local directory.

Families exercised by the tests: LLaVA (1.5 and 1.6 / llava-next), SmolVLM (Idefics3), Qwen2-VL
and Qwen2.5-VL, PaliGemma. The processor's chat template builds the prompt (PaliGemma has none:
its prompt is the plain text), batches are left-padded, and `model.generate` does the decoding.
What differs by family is in families.py.
"""

from __future__ import annotations

import torch
from PIL import Image

from pixelray.device import resolve_device, resolve_dtype
from pixelray.generators.base import (GenerationConfig, GenerationResult, Generator, Message, check_batch,
                                      context_length, decode_results, decoding_kwargs, end_and_pad_ids,
                                      within_context)
from pixelray.generators.families import chat_prompts, family, processor_fit
from pixelray.hub import not_available


class PretrainedGenerator(Generator):
    """A backend loaded by transformers' from_pretrained: the model on its device, its processor or
    tokenizer (left padding), and the ids that end a reply."""

    def __init__(self, model_class, processing_class, source: str, device: str, dtype: str,
                 quantization: str | None, name: str | None):
        self.name = name or source
        self.model, self.processor, self.device, self.dtype = load_pretrained(  # a processor or a tokenizer
            model_class, processing_class, source, device, dtype, quantization)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        self.end_ids, self.pad_id = end_and_pad_ids(self.model.generation_config, self.tokenizer)
        self.context = context_length(self.model.config)

    def _generate(self, inputs: dict, config: GenerationConfig, streamer) -> list[GenerationResult]:
        """model.generate on a left-padded batch, its new tokens decoded per prompt (as many as the context holds)."""
        config = within_context(inputs["input_ids"].shape[1], config, self.context)
        out = self.model.generate(**inputs, streamer=streamer, **decoding_kwargs(config, self.pad_id, self.tokenizer))
        return decode_results(out[:, inputs["input_ids"].shape[1]:], inputs["attention_mask"], self.tokenizer,
                              self.end_ids, self.pad_id, config)


class HFGenerator(PretrainedGenerator):
    def __init__(self, source: str, device: str = "auto", dtype: str = "auto", quantization: str | None = None,
                 name: str | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        super().__init__(AutoModelForImageTextToText, AutoProcessor, source, device, dtype, quantization, name)
        self.family = family(self.model.config.model_type)
        self.image_fit = processor_fit(getattr(self.processor, "image_processor", None))

    def prompts(self, conversations: list[list[Message]]) -> list[str]:
        return chat_prompts(self.processor, self.family, conversations)

    @torch.inference_mode()
    def chat_batch(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult]:
        check_batch(conversations, images)
        flat = [im for ims in images for im in ims]
        image_arg = images if self.family.nested_images else flat
        inputs = self.processor(text=self.prompts(conversations), images=image_arg or None, padding=True,
                                return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k != "labels"}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return self._generate(inputs, config, streamer)


def load_pretrained(model_class, processing_class, source: str, device: str, dtype: str, quantization: str | None):
    """(model in eval mode on its device, processor or tokenizer, device, dtype) by from_pretrained;
    a model loaded in 4/8 bits is placed by bitsandbytes."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kwargs: dict = {"dtype": dtype, **(quantization_kwargs(quantization, device) if quantization else {})}
    try:
        processing = processing_class.from_pretrained(source)
        model = model_class.from_pretrained(source, **kwargs)
    except Exception as e:
        raise not_available(source, e) from None
    if not quantization:
        model.to(device)
    return model.eval(), processing, device, dtype


def quantization_kwargs(bits: str, device: torch.device) -> dict:
    """from_pretrained arguments for bitsandbytes 4/8-bit loading (CUDA only: a clear error elsewhere)."""
    if bits not in ("4bit", "8bit"):
        raise ValueError(f"quantization must be 4bit or 8bit, not {bits!r}")
    if device.type != "cuda":
        raise ValueError(f"{bits} loading uses bitsandbytes and needs CUDA; this device is {device.type}")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True) if bits == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": device.index or 0}}
