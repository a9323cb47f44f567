"""The `mlx` backend: mlx-vlm models on Apple silicon (and on mlx's CPU build elsewhere).

    gen = create_generator("mlx:mlx-community/Qwen2-VL-2B-Instruct-4bit")   # or mlx:DIR
    gen = create_generator("mlx:DIR?max_image_size=768&min_image_size=56")  # image size limits, in pixels
    gen.generate(images, "Describe the image.", GenerationConfig(max_new_tokens=64))

Loaded through mlx-vlm's own `load`; prompts through its `apply_chat_template` (the Hugging Face
message format, image parts in place); text through `stream_generate`, one conversation at a time:
mlx-vlm's `batch_generate` takes one image per prompt and one sampler for the whole batch, and
reports no per-prompt token counts or finish reasons. mlx-vlm keeps per-call state on the model and
its tokenizer, so calls are serialised with a lock. Images are converted to RGB and fitted between
`min_image_size` and `max_image_size` pixels on their sides before the model's own processor.

mlx is imported only here, when such a model is made: Linux users without mlx are unaffected. On a
Ray cluster the actors and replicas of this backend ask for the `mlx` resource, which only the
Apple-silicon nodes of the MLX node pool carry (pixelray.runtime).
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import parse_qsl

from PIL import Image

from pixelray.generators.base import (GenerationConfig, GenerationResult, Generator, Message, check_batch,
                                      count_images, cut_at_stop, literal_text)
from pixelray.hub import not_available
from pixelray.images import ImageFit

INSTALL = ("the mlx backend needs mlx-vlm: `pip install 'pixelray[mlx]'` (Apple silicon; on Linux x86_64 it "
           "installs mlx's CPU build)")


class MLXGenerator(Generator):
    def __init__(self, source: str, device: str = "auto", name: str | None = None, max_image_size: int = 1024,
                 min_image_size: int = 28):
        if device not in ("auto", "cpu", "mps"):
            raise ValueError(f"the mlx backend runs on the Apple GPU (auto, mps) or the CPU, not {device!r}")
        try:
            import mlx.core as mx
            if device == "cpu":  # before mlx_vlm is imported: it makes its generation stream on import
                mx.set_default_device(mx.cpu)
            import mlx_vlm
        except ImportError as e:
            raise ImportError(f"{INSTALL} ({e})") from None
        self.name = name or f"mlx:{source}"
        source, _, query = source.partition("?")
        limits = {k: int(v) for k, v in parse_qsl(query, strict_parsing=bool(query))}
        if unknown := set(limits) - {"max_image_size", "min_image_size"}:
            raise ValueError(f"mlx model {source!r}: unknown settings {sorted(unknown)}; known: max_image_size, "
                             "min_image_size")
        max_image_size = limits.get("max_image_size", max_image_size)
        min_image_size = limits.get("min_image_size", min_image_size)
        if not 1 <= min_image_size <= max_image_size:
            raise ValueError(f"image size limits must be 1 <= min ({min_image_size}) <= max ({max_image_size})")
        local = Path(source).expanduser()
        try:
            self.model, self.processor = mlx_vlm.load(str(local.resolve()) if local.is_dir() else source)
        except Exception as e:
            raise not_available(source, e) from None
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.max_image_size, self.min_image_size = max_image_size, min_image_size
        self.image_fit = ImageFit(long_side=max_image_size)
        self._lock = threading.Lock()

    def prompt(self, conversation: list[Message]) -> str:
        from mlx_vlm.prompt_utils import apply_chat_template

        conversation = literal_text([conversation], self.tokenizer)[0]
        return apply_chat_template(self.processor, self.model.config, conversation,
                                   num_images=count_images(conversation))

    def fit(self, image: Image.Image) -> Image.Image:
        """RGB, longest side at most max_image_size, shortest at least min_image_size (aspect kept)."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        scale = min(1.0, self.max_image_size / max(image.size))
        scale = max(scale, self.min_image_size / min(image.size))
        if scale != 1.0:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BICUBIC)
        return image

    def chat_batch(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult]:
        check_batch(conversations, images)
        return [self._reply(c, ims, config, streamer) for c, ims in zip(conversations, images)]

    def _reply(self, conversation: list[Message], images: list[Image.Image], config: GenerationConfig,
               streamer) -> GenerationResult:
        import mlx.core as mx
        import numpy as np
        from mlx_vlm import stream_generate

        kwargs = {"max_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p}
        if config.seed is not None:
            kwargs["seed"] = config.seed
        text, finish, tokens, prompt_tokens = "", "length", 0, 0
        with self._lock:
            if streamer is not None:
                streamer.put(np.zeros(1, np.int64))  # the prompt first, as transformers' generate() does
            try:
                for step in stream_generate(self.model, self.processor, self.prompt(conversation),
                                            image=[self.fit(im) for im in images] or None, **kwargs):
                    text += step.text
                    if streamer is not None and step.generation_tokens > tokens:  # (the last step repeats its token)
                        streamer.put(np.asarray([int(step.token)]))
                    tokens, prompt_tokens = step.generation_tokens, step.prompt_tokens
                    if step.finish_reason:
                        finish = "length" if step.finish_reason == "length" else "stop"
                    text, stopped = cut_at_stop(text, config.stop)
                    if stopped:
                        finish = "stop"
                        break
            finally:
                mx.clear_cache()  # stream_generate does this itself only when it runs to the end
                if streamer is not None:
                    streamer.end()
        return GenerationResult(text=text.strip(), num_tokens=tokens, finish_reason=finish,
                                prompt_tokens=prompt_tokens)
