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
    prompt_tokens: int = 0  # the prompt's tokens, image tokens included


def user_turn(prompt: str, with_image: bool = True) -> Message:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return {"role": "user", "content": content}


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (which is dropped, as OpenAI-compatible servers do)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def count_images(conversation: list[Message]) -> int:
    """The `{"type": "image"}` parts of a conversation."""
    return sum(1 for m in conversation if isinstance(m["content"], list)
               for c in m["content"] if c.get("type") == "image")


def check_batch(conversations: list[list[Message]], images: list[list[Image.Image]]) -> None:
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    for i, (conversation, ims) in enumerate(zip(conversations, images)):
        if (parts := count_images(conversation)) != len(ims):
            raise ValueError(f"conversation {i} has {parts} image parts but {len(ims)} images")


def decoding_kwargs(config: GenerationConfig, pad_id: int | None, tokenizer) -> dict[str, Any]:
    """`generate()` keyword arguments for a GenerationConfig (greedy at temperature 0)."""
    import torch

    kwargs: dict[str, Any] = dict(max_new_tokens=config.max_new_tokens, pad_token_id=pad_id)
    if config.temperature > 0:
        kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p)
        if config.seed is not None:
            torch.manual_seed(config.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if config.stop:
        kwargs.update(stop_strings=config.stop, tokenizer=tokenizer)
    return kwargs


def end_and_pad_ids(generation_config, tokenizer) -> tuple[set[int], int | None]:
    """The ids that end a reply (the model's eos, which may be several) and the padding id."""
    eos = generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = generation_config.pad_token_id
    return set(eos if isinstance(eos, list) else [eos]), tokenizer.pad_token_id if pad is None else pad


def decode_result(tokens: list[int], tokenizer, end_ids: set[int], pad_id: int | None,
                  config: GenerationConfig, prompt_tokens: int = 0) -> GenerationResult:
    """Generated ids -> text, cut at the end-of-turn token or a stop string, with the token count."""
    ended = next((i for i, t in enumerate(tokens) if t in end_ids), None)
    if ended is not None:
        tokens = tokens[:ended]
    elif pad_id is not None:  # rows that stopped on a stop string are padded after it
        while tokens and tokens[-1] == pad_id:
            tokens = tokens[:-1]
    text, stopped = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), config.stop)
    finish = "stop" if ended is not None or stopped or len(tokens) < config.max_new_tokens else "length"
    return GenerationResult(text=text.strip(), num_tokens=len(tokens), finish_reason=finish,
                            prompt_tokens=prompt_tokens)


class Generator(ABC):
    """A loaded vision-language model."""

    name: str
    tokenizer: Any  # decodes the ids a `streamer` is given
    waits_on_network = False  # True when generating mostly waits on another server (the hybrid)

    @abstractmethod
    def chat(self, conversations: list[list[Message]], images: list[list[Image.Image]],
             config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult]:
        """One reply per conversation, generated as one batch; `streamer` (a transformers
        BaseStreamer) is handed each step's new token ids, as `generate()` does."""

    def chat_items(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig()) -> list[GenerationResult | Exception]:
        """`chat`, with each conversation's failure as its own list item: the batch at once, and if
        that fails, each conversation alone, so one bad item fails only itself."""
        try:
            return self.chat(conversations, images, config)
        except Exception as e:
            if len(conversations) == 1:
                return [e]
        return [self.chat_items([c], [ims], config)[0] for c, ims in zip(conversations, images)]

    def generate(self, images: list[Image.Image], prompts: list[str] | str,
                 config: GenerationConfig = GenerationConfig()) -> list[GenerationResult]:
        """One image and one prompt (or the same prompt for all) per item, generated as one batch."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return self.chat([[user_turn(p)] for p in prompts], [[im] for im in images], config)
