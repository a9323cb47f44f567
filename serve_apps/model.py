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

Each replica records its model's series (pixelray.telemetry): batch sizes, requests waiting for a batch,
tokens, and the time to first token (a batch's first step, seen by a FirstToken streamer; a stream's
first piece).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

from PIL import Image
from ray import serve

from pixelray import telemetry
from pixelray.generators import GenerationConfig, GenerationResult, ImageFit, Message, create_generator
from pixelray.generators.streaming import FirstToken

Item = tuple[list[Message], list[Image.Image], GenerationConfig, float]  # ..., when it arrived (perf_counter)


@serve.deployment
class VLMModel:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, name: str | None = None):
        self.generator = create_generator(model, device=device, dtype=dtype)
        self.name = name or model  # as clients call it: the metrics' `model`
        self.cancelled = self.last_cancelled_tokens = 0
        self.batches = self.batched = 0  # generate calls, and the requests they held (how full batches run)
        self.waiting = 0  # requests not yet in a batch
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def generate(self, conversation: list[Message], images: list[Image.Image],
                       config: GenerationConfig) -> GenerationResult:
        self._wait(1)
        result = await self.generate_batch((conversation, images, config, time.perf_counter()))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[Item]) -> list[GenerationResult | Exception]:
        self._wait(-len(items))
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item[2].model_dump_json(), []).append(i)
        results: list[GenerationResult | Exception] = [None] * len(items)  # type: ignore[list-item]
        for indices in groups.values():
            batch = [items[i] for i in indices]
            self.batches, self.batched = self.batches + 1, self.batched + len(batch)
            telemetry.SERVE_BATCH_SIZE.observe(len(batch), model=self.name)
            first = FirstToken()
            args = ([c for c, *_ in batch], [ims for _, ims, *_ in batch], batch[0][2], first)
            if self.generator.waits_on_network:  # hybrid, remote: the loop stays free while their server works
                outcomes = await asyncio.to_thread(self.generator.chat_items, *args)
            else:
                outcomes = self.generator.chat_items(*args)
            for i, outcome in zip(indices, outcomes):
                results[i] = outcome
                if isinstance(outcome, GenerationResult):
                    telemetry.generated(self.name, outcome, items[i][3], first.at)
        return results

    async def stream(self, conversation: list[Message], images: list[Image.Image],
                     config: GenerationConfig) -> AsyncIterator[str | GenerationResult]:
        reply, cancel = telemetry.Reply(self.name), threading.Event()
        pieces = self.generator.stream(conversation, images, config, cancel, self._cancelled)
        try:
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                yield reply.saw(piece)
        finally:
            cancel.set()  # the client went away (Serve cancels the call): the generation stops at its next token

    def _wait(self, change: int) -> None:
        self.waiting += change
        telemetry.SERVE_QUEUE.set(self.waiting, model=self.name)

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

