"""The one generator interface: images + prompt -> text, batched, and its multi-turn chat form.

Conversations use the Hugging Face chat format, with images passed alongside in the order their
`{"type": "image"}` parts appear:

    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "And its size?"}]},
    ]
    generator.chat([conversation], [[image]], GenerationConfig(max_new_tokens=32))
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

Message = dict[str, Any]


class GenerationConfig(BaseModel):
    """Decoding settings; temperature 0 means greedy."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=8)


@dataclass
class GenerationResult:
    text: str
    num_tokens: int  # generated tokens, the end-of-turn token excluded
    finish_reason: Literal["stop", "length"]


def user_turn(prompt: str, with_image: bool = True) -> Message:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return {"role": "user", "content": content}


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (which is dropped, as OpenAI-compatible servers do)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Generator(ABC):
    """A loaded vision-language model."""

    name: str

    @abstractmethod
    def chat(self, conversations: list[list[Message]], images: list[list[Image.Image]],
             config: GenerationConfig = GenerationConfig()) -> list[GenerationResult]:
        """One reply per conversation, generated as one batch."""

    def generate(self, images: list[Image.Image], prompts: list[str] | str,
                 config: GenerationConfig = GenerationConfig()) -> list[GenerationResult]:
        """One image and one prompt (or the same prompt for all) per item, generated as one batch."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return self.chat([[user_turn(p)] for p in prompts], [[im] for im in images], config)
