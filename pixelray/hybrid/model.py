"""HybridPixelLLM: a vision encoder's features, summarised to text, captioned by an LLM server.

    hybrid = HybridPixelLLM({"encoder": "clip", "llm": {"base_url": "http://localhost:1234/v1"}})
    hybrid.generate(image)                          # "A dog runs on a beach." (raises LLMServerError)
    hybrid.generate_batch(images)                   # [caption or None per image], bounded concurrency
    generate_caption_with_lm_studio(features)       # from features already extracted

    image -> VisionFeatureExtractor -> [patches, dim] -> FeatureSummarizer -> compact JSON text
          -> PromptTemplate -> OpenAI-compatible /v1/chat/completions (LM Studio) -> caption

The encoder and the LLM are independent: swap the LLM (any model the server has) without touching
the encoder, or the encoder without retraining anything. `HybridConfig.from_source` reads the
`hybrid:ENCODER?key=value&...` model names that `pixelray caption --model` and the Serve app take.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from pixelray.generators.base import DEFAULT_PROMPT
from pixelray.hybrid.client import Completion, LLMServerError, LMStudioClient, LMStudioConfig
from pixelray.hybrid.features import VisionFeatureExtractor
from pixelray.hybrid.summary import FeatureSummarizer, FeatureSummary, PromptTemplate

logger = logging.getLogger(__name__)


class HybridConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    encoder: str = "clip"  # a registry name, folder, hub id, or a vision_encoder.pt checkpoint
    device: str = "auto"
    template: str = "caption"  # a TEMPLATES name or a str.format template over PLACEHOLDERS
    num_samples: int = Field(6, ge=0)  # salient patches in the summary
    dims: int = Field(8, ge=1)  # numbers per summarised vector
    batch_size: int = Field(16, ge=1)  # images per encoder forward pass
    llm: LMStudioConfig = LMStudioConfig()

    @classmethod
    def from_source(cls, source: str) -> HybridConfig:
        """`ENCODER?url=http://host:1234/v1&model=NAME&template=detailed&...` (every part optional):
        a key names a field of HybridConfig or of LMStudioConfig (`url` is `base_url`)."""
        encoder, _, query = source.partition("?")
        top: dict[str, Any] = {"encoder": encoder} if encoder else {}
        llm: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            key = "base_url" if key == "url" else key
            if key in LMStudioConfig.model_fields and key != "api_key":
                llm[key] = value
            elif key in cls.model_fields and key not in ("llm", "encoder"):
                top[key] = value
            else:
                known = sorted({"url", *LMStudioConfig.model_fields, *cls.model_fields} - {"llm", "encoder", "api_key"})
                raise ValueError(f"hybrid model {source!r}: unknown setting {key!r}; known: {', '.join(known)}")
        return cls.model_validate({**top, "llm": llm})


class HybridPixelLLM:
    def __init__(self, config: HybridConfig | dict[str, Any] | None = None,
                 extractor: VisionFeatureExtractor | None = None):
        self.config = config if isinstance(config, HybridConfig) else HybridConfig.model_validate(config or {})
        self.template = PromptTemplate(self.config.template)  # a bad template fails here, not per request
        self.summarizer = FeatureSummarizer(self.config.num_samples, self.config.dims)
        self.extractor = extractor or VisionFeatureExtractor(self.config.encoder, device=self.config.device)
        self.client = LMStudioClient(self.config.llm)
        self.pool = ThreadPoolExecutor(self.config.llm.max_concurrency, thread_name_prefix="llm")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def summarize(self, images: list[Image.Image]) -> list[FeatureSummary]:
        features = self.extractor.extract_features_batch(images, self.config.batch_size)
        return [self.summarizer.summarize(f) for f in features]

    def complete_all(self, conversations: list[list[dict[str, Any]]],
                     **settings) -> list[Completion | LLMServerError]:
        """One completion per message list, at most `max_concurrency` requests at a time; a failed
        request is its LLMServerError in the list, the others go on."""
        def one(messages):
            try:
                return self.client.complete(messages, **settings)
            except LLMServerError as e:
                return e
        return list(self.pool.map(one, conversations))

    def _captions(self, images: list[Image.Image], prompt: str | None, max_tokens: int | None,
                  temperature: float | None) -> list[Completion | LLMServerError]:
        text = prompt or DEFAULT_PROMPT
        messages = [[{"role": "user", "content": self.template.render(s, text)}] for s in self.summarize(images)]
        return self.complete_all(messages, max_tokens=max_tokens, temperature=temperature)

    def generate(self, images: Image.Image | list[Image.Image], max_tokens: int | None = None,
                 temperature: float | None = None, prompt: str | None = None) -> str | list[str]:
        """The caption of one image (or a list of captions); a failed request raises LLMServerError."""
        single = isinstance(images, Image.Image)
        results = self._captions([images] if single else list(images), prompt, max_tokens, temperature)
        if failed := next((r for r in results if isinstance(r, LLMServerError)), None):
            raise failed
        texts = [r.text for r in results]
        return texts[0] if single else texts

    def generate_batch(self, images: list[Image.Image], max_tokens: int | None = None,
                       temperature: float | None = None, prompt: str | None = None) -> list[str | None]:
        """A caption per image, None where the LLM request failed (the reason is logged)."""
        results = self._captions(list(images), prompt, max_tokens, temperature)
        for i, r in enumerate(results):
            if isinstance(r, LLMServerError):
                logger.warning("hybrid caption %d of %d failed: %s", i + 1, len(results), r)
        return [None if isinstance(r, LLMServerError) else r.text for r in results]


def generate_caption_with_lm_studio(features: torch.Tensor, prompt: str = DEFAULT_PROMPT,
                                    config: LMStudioConfig | dict[str, Any] | None = None,
                                    template: str = "caption", max_tokens: int | None = None,
                                    temperature: float | None = None) -> str:
    """A caption from one image's patch features [num_patches, dim], without an encoder."""
    config = config if isinstance(config, LMStudioConfig) else LMStudioConfig.model_validate(config or {})
    text = PromptTemplate(template).render(FeatureSummarizer().summarize(features), prompt)
    client = LMStudioClient(config)
    try:
        return client.complete([{"role": "user", "content": text}], max_tokens, temperature).text
    finally:
        client.close()
