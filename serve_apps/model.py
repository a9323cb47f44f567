"""The model deployment: one generator per replica, with dynamic batching.

Concurrent requests are gathered by `@serve.batch` (up to `max_batch_size`, waiting at most
`batch_wait_timeout_s`) and generated together, one `Generator.chat` call per distinct decoding
config in the batch. `max_batch_size: 1` turns batching off. Streaming requests generate alone (in
a thread) and send text pieces as the tokens come; a client that goes away stops its generation.

A batch is generated on the replica's event loop, blocking it, on purpose: Serve forms the next
batch as soon as the previous one starts, so a batch handler that yields while the model works
(e.g. `asyncio.to_thread`) gets batches of whatever arrived in the first milliseconds, mostly one
request. Blocking, the requests that arrive during a batch wait in the queue and the next batch
takes them all: 15 of 16 at once and 4x the requests/s in `benchmarks/serve_load.py`, against
2.1x with a thread. The cost: a streamed reply on the same replica pauses while a batch runs.
A model behind a server (hybrid, remote), whose batch mostly waits on the network, runs in a thread
instead, and streams its server's chunks through as they arrive.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from PIL import Image
from ray import serve

from pixelray.generators import GenerationConfig, GenerationResult, ImageFit, Message, create_generator

Item = tuple[list[Message], list[Image.Image], GenerationConfig]


@serve.deployment
class VLMModel:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01):
        self.generator = create_generator(model, device=device, dtype=dtype)
        self.cancelled = self.last_cancelled_tokens = 0
        self.batches = self.batched = 0  # generate calls, and the requests they held (how full batches run)
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def generate(self, conversation: list[Message], images: list[Image.Image],
                       config: GenerationConfig) -> GenerationResult:
        result = await self.generate_batch((conversation, images, config))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[Item]) -> list[GenerationResult | Exception]:
        groups: dict[str, list[int]] = {}
        for i, (_, _, config) in enumerate(items):
            groups.setdefault(config.model_dump_json(), []).append(i)
        results: list[GenerationResult | Exception] = [None] * len(items)  # type: ignore[list-item]
        for indices in groups.values():
            batch = [items[i] for i in indices]
            self.batches, self.batched = self.batches + 1, self.batched + len(batch)
            args = ([c for c, _, _ in batch], [ims for _, ims, _ in batch], batch[0][2])
            if self.generator.waits_on_network:  # hybrid, remote: the loop stays free while their server works
                outcomes = await asyncio.to_thread(self.generator.chat_items, *args)
            else:
                outcomes = self.generator.chat_items(*args)
            for i, outcome in zip(indices, outcomes):
                results[i] = outcome
        return results

    async def stream(self, conversation: list[Message], images: list[Image.Image],
                     config: GenerationConfig) -> AsyncIterator[str | GenerationResult]:
        cancel = threading.Event()
        pieces = self.generator.stream(conversation, images, config, cancel, self._cancelled)
        try:
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                yield piece
        finally:
            cancel.set()  # the client went away (Serve cancels the call): the generation stops at its next token

    def image_fit(self) -> ImageFit | None:
        """How far an image may be scaled down before this model sees less of it (/chat keeps images so)."""
        return self.generator.image_fit

    def _cancelled(self, tokens: int) -> None:
        self.cancelled, self.last_cancelled_tokens = self.cancelled + 1, tokens

    def stats(self) -> dict[str, int]:
        """Streams stopped because their client went away, and the tokens the last one had generated; the
        batches generated and the requests in them (their mean over max_batch_size: how full batches run)."""
        return {"cancelled": self.cancelled, "last_cancelled_tokens": self.last_cancelled_tokens,
                "batches": self.batches, "batched_requests": self.batched}

