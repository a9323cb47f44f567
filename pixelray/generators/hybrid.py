"""The `hybrid` backend: HybridPixelLLM behind the generator interface, so that `pixelray caption`
and the Serve app run it like any other model (`--model hybrid:clip?url=http://host:1234/v1`).

Each image part of a conversation becomes the prompt template rendered with that image's feature
summary (and the turn's text); the conversation then goes to the LLM server as plain text. A
batch's images go through the encoder together; the LLM requests run concurrently, bounded by
`max_concurrency`, and a failed request fails only its own item (an LLMServerError, 502 or 503). A
streamed reply passes the LLM server's chunks on as they arrive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image

from pixelray.generators.base import GenerationConfig, GenerationResult, Message, ServerGenerator, count_images
from pixelray.generators.streaming import completion_result, settings_of, stream_completion
from pixelray.hybrid import Completion, HybridConfig, HybridPixelLLM, LLMServerError, PromptTemplate
from pixelray.hybrid.summary import FeatureSummary


class HybridGenerator(ServerGenerator):
    def __init__(self, source: str, device: str = "auto", name: str | None = None):
        config = HybridConfig.from_source(source)
        if device != "auto":
            config = config.model_copy(update={"device": device})
        self.hybrid = HybridPixelLLM(config)
        self.name = name or f"hybrid:{source}"

    def chat_items(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult | Exception]:
        if len(conversations) != len(images):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        summaries = iter(self.hybrid.summarize([im for ims in images for im in ims]) if any(images) else [])
        requests = []
        for conversation, ims in zip(conversations, images):
            turn = [next(summaries) for _ in ims]
            try:
                requests.append(to_llm_messages(conversation, turn, self.hybrid.template))
            except ValueError as e:
                requests.append(e)
        completions = iter(self.hybrid.complete_all(
            [r for r in requests if not isinstance(r, Exception)], **settings_of(config)))
        return [r if isinstance(r, Exception) else _result(next(completions)) for r in requests]

    def stream(self, conversation: list[Message], images: list[Image.Image],
               config: GenerationConfig = GenerationConfig(), cancel: threading.Event | None = None,
               on_cancelled: Callable[[int], None] | None = None) -> Iterator[str | GenerationResult]:
        """The LLM server's streamed reply, passed on as its chunks arrive (the encoder runs at the first
        `next`, in the reader's thread)."""
        messages = to_llm_messages(conversation, self.hybrid.summarize(images) if images else [],
                                   self.hybrid.template)
        deltas = self.hybrid.client.stream(messages, **settings_of(config))
        yield from stream_completion(deltas, cancel, on_cancelled)


def _result(completion: Completion | LLMServerError) -> GenerationResult | LLMServerError:
    return completion if isinstance(completion, LLMServerError) else completion_result(completion)


def to_llm_messages(conversation: list[Message], summaries: list[FeatureSummary],
                    template: PromptTemplate) -> list[dict[str, Any]]:
    """A conversation with image parts -> text-only chat messages: the turn that holds an image
    becomes the template rendered with the image's summary and the turn's text."""
    if count_images(conversation) != len(summaries):
        raise ValueError(f"the conversation has {count_images(conversation)} image parts but {len(summaries)} images")
    pending = iter(summaries)
    messages = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
            continue
        text = " ".join(c["text"] for c in content if c.get("type") == "text" and c.get("text"))
        turn = [next(pending) for c in content if c.get("type") == "image"]
        if turn:  # every image's summary, the turn's own text after the last one
            text = "\n\n".join([template.render(s, "") for s in turn[:-1]] + [template.render(turn[-1], text)])
        messages.append({"role": message["role"], "content": text})
    return messages
