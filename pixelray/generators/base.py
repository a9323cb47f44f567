"""The one generator interface: images and text in, text out, the same over every backend.

For people (notebooks, scripts), text in and text out, one image or a batch:

    model.caption(image)                                   # image: a PIL image, or a path or URI to open
    model.answer(image, "What colour is the circle?")
    model.caption_batch(images), model.answer_batch(images, questions)   # one batched generate each
    history = []
    model.chat("What is this?", image=image, history=history)          # history grows by the two turns
    model.chat("And its size?", history=history, max_new_tokens=16)    # GenerationConfig's fields as keywords

For the jobs and the Serve app, batches of conversations in the Hugging Face chat format, with the
images passed alongside in the order their `{"type": "image"}` parts appear, and full results:

    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "And its size?"}]},
    ]
    model.chat_batch([conversation], [[image]], GenerationConfig(max_new_tokens=32))   # [GenerationResult]
    model.chat_items(...)                                  # the same, each item's failure its own entry
    model.stream(conversation, [image], config)            # text pieces as they come, then the GenerationResult
    model.generate(images, prompts, config)                # one single-turn conversation per image

A backend implements `chat_batch`; everything else is built on it here.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from pixelray.images import ImageFit, ImageInput, as_image

Message = dict[str, Any]
DEFAULT_PROMPT = "Describe the image."


class GenerationConfig(BaseModel):
    """Decoding settings; temperature 0 means greedy."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=8192, description="the most tokens a reply may have")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 decodes greedily")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: the probability mass sampled from")
    seed: int | None = Field(None, ge=0, lt=2**63, description="the sampling seed")
    stop: list[str] = Field(default_factory=list, max_length=8, description="a stop string: the reply ends before it")


@dataclass
class GenerationResult:
    text: str
    num_tokens: int  # generated tokens, the end-of-turn token excluded
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int = 0  # the prompt's tokens, image tokens included


def user_turn(prompt: str, with_image: bool = True) -> Message:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return {"role": "user", "content": content}


@lru_cache(maxsize=16)
def special_tokens(tokenizer) -> re.Pattern | None:
    """What a tokenizer reads as one special token wherever it appears in a prompt (`<image>`, `<|im_end|>`)."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and len(t.content) > 1}
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None


def literal_text(conversations: list[list[Message]], tokenizer) -> list[list[Message]]:
    """The conversations with their text kept as text: a special token's string typed into a message is broken
    by a zero-width space after its first character, so it is tokenised as the characters it reads as and
    never becomes the token (an image placeholder, an end of turn). Templates add the real ones."""
    if (pattern := special_tokens(tokenizer)) is None:
        return conversations

    def text(s: str) -> str:
        return pattern.sub(lambda m: m[0][0] + "\u200b" + m[0][1:], s)

    def message(m: Message) -> Message:
        content = m["content"]
        if isinstance(content, str):
            return {**m, "content": text(content)}
        return {**m, "content": [{**c, "text": text(c["text"])} if c.get("type") == "text" and isinstance(
            c.get("text"), str) else c for c in content]}

    return [[message(m) for m in c] for c in conversations]


def reply_text(decoded: str) -> str:
    """A reply's text as every backend gives it: without surrounding whitespace, nor a last character whose
    bytes the token limit cut off (it decodes as U+FFFD)."""
    return decoded.strip().rstrip("\ufffd").rstrip()


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (which is dropped, as OpenAI-compatible servers do)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def count_images(conversation: list[Message]) -> int:
    """The `{"type": "image"}` parts of a conversation."""
    return sum(1 for m in conversation if isinstance(m["content"], list)
               for c in m["content"] if c.get("type") == "image")


def split_images(conversation: list[Message]) -> tuple[list[Message], list[Image.Image]]:
    """A conversation whose image parts hold their image (`{"type": "image", "image": ...}`) -> the
    conversation with bare image parts, and its images in order."""
    images: list[Image.Image] = []
    bare = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, list):
            content = [dict(part) for part in content]
            for part in content:
                if part.get("type") == "image":
                    if "image" not in part:
                        raise ValueError("an image part of the history has no image: keep the history chat() fills")
                    images.append(as_image(part.pop("image")))
        bare.append({**message, "content": content})
    return bare, images


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
        # nucleus sampling only, as OpenAI's API and vLLM have it (transformers would add its default top_k of 50)
        kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0)
        if config.seed is not None:
            torch.manual_seed(config.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if config.stop:
        kwargs.update(stop_strings=config.stop, tokenizer=tokenizer)
    return kwargs


def context_length(model_config) -> int | None:
    """The most positions the model's language model takes (None when its config does not say)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "max_position_embeddings", None)


def within_context(prompt_tokens: int, config: GenerationConfig, context: int | None) -> GenerationConfig:
    """`config` with max_new_tokens cut to the room the prompt leaves in the context (the reply then ends
    with finish_reason "length"); a prompt that fills the context is refused (ValueError) before it runs."""
    if context is None or prompt_tokens + config.max_new_tokens <= context:
        return config
    if prompt_tokens >= context:
        raise ValueError(f"the prompt is {prompt_tokens:,} tokens (images included), over the model's context of "
                         f"{context:,}: shorten it")
    return config.model_copy(update={"max_new_tokens": context - prompt_tokens})


def end_and_pad_ids(generation_config, tokenizer) -> tuple[set[int], int | None]:
    """The ids that end a reply (the model's eos, which may be several) and the padding id."""
    eos = generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = generation_config.pad_token_id
    return set(eos if isinstance(eos, list) else [eos]), tokenizer.pad_token_id if pad is None else pad


def decode_results(rows, attention_mask, tokenizer, end_ids: set[int], pad_id: int | None,
                   config: GenerationConfig) -> list[GenerationResult]:
    """A batch's generated ids (one row per prompt) -> results; the prompts' lengths come from the mask."""
    return [decode_result(row.tolist(), tokenizer, end_ids, pad_id, config, int(n))
            for row, n in zip(rows, attention_mask.sum(1))]


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
    return GenerationResult(text=reply_text(text), num_tokens=len(tokens), finish_reason=finish,
                            prompt_tokens=prompt_tokens)


class Generator(ABC):
    """A loaded vision-language model."""

    name: str
    tokenizer: Any  # decodes the ids a `streamer` is given
    waits_on_network = False  # True when generating mostly waits on another server (the hybrid)
    image_fit: ImageFit | None = None  # what the model's preprocessing keeps of an image (None: unknown)

    @abstractmethod
    def chat_batch(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult]:
        """One reply per conversation, generated as one batch; `streamer` (a transformers
        BaseStreamer) is handed each step's new token ids, as `generate()` does."""

    def chat_items(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult | Exception]:
        """`chat_batch`, with each conversation's failure as its own list item: the batch at once (`streamer`
        sees it), and if that fails, each conversation alone, so one bad item fails only itself."""
        try:
            return self.chat_batch(conversations, images, config, streamer=streamer)
        except Exception as e:
            if len(conversations) == 1:
                return [e]
        return [self.chat_items([c], [ims], config)[0] for c, ims in zip(conversations, images)]

    def stream(self, conversation: list[Message], images: list[Image.Image],
               config: GenerationConfig = GenerationConfig(), cancel=None, on_cancelled=None):
        """One reply, streamed: text pieces as they come, then the GenerationResult (see
        pixelray.generators.streaming: `cancel`, a threading.Event, stops it at its next token)."""
        from pixelray.generators.streaming import stream_reply

        return stream_reply(self, conversation, images, config, cancel, on_cancelled)

    def generate(self, images: list[Image.Image], prompts: list[str] | str,
                 config: GenerationConfig = GenerationConfig()) -> list[GenerationResult]:
        """One image and one prompt (or the same prompt for all) per item, generated as one batch."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return self.chat_batch([[user_turn(p)] for p in prompts], [[as_image(im)] for im in images], config)

    # --- text in, text out ---------------------------------------------------------------------

    def caption_batch(self, images: list[ImageInput], prompt: str = DEFAULT_PROMPT, **settings) -> list[str]:
        return [r.text for r in self.generate(images, prompt, GenerationConfig(**settings))]

    def caption(self, image: ImageInput, prompt: str = DEFAULT_PROMPT, **settings) -> str:
        return self.caption_batch([image], prompt, **settings)[0]

    def answer_batch(self, images: list[ImageInput], questions: list[str], **settings) -> list[str]:
        return [r.text for r in self.generate(images, list(questions), GenerationConfig(**settings))]

    def answer(self, image: ImageInput, question: str, **settings) -> str:
        return self.answer_batch([image], [question], **settings)[0]

    def chat(self, message: str, image: ImageInput | None = None, history: list[Message] | None = None,
             **settings) -> str:
        """The reply to `message` (about `image`, when given) after the turns in `history`, which then
        holds this turn and the reply too (its image parts carry their images)."""
        user = user_turn(message, with_image=image is not None)
        if image is not None:
            user["content"][0]["image"] = as_image(image)
        conversation, images = split_images([*(history or []), user])
        reply = self.chat_batch([conversation], [images], GenerationConfig(**settings))[0].text
        if history is not None:
            history += [user, {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        return reply


class ServerGenerator(Generator):
    """A model behind a server (the hybrid, the remote backend): every conversation is a request of its own,
    so a backend implements `chat_items`, and a failed request fails only its item; `chat_batch` raises the
    first failure."""

    tokenizer = None  # the server decodes
    waits_on_network = True

    @abstractmethod
    def chat_items(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult | Exception]:
        """One reply or failure per conversation (no `streamer`: the server has the tokens)."""

    def chat_batch(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult]:
        outcomes = self.chat_items(conversations, images, config)
        if failed := next((o for o in outcomes if isinstance(o, Exception)), None):
            raise failed
        return outcomes  # type: ignore[return-value]
