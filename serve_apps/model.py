"""The model deployment: one generator per replica, with dynamic batching.

Concurrent requests are gathered by `@serve.batch` (up to `max_batch_size`, waiting at most
`batch_wait_timeout_s`) and generated together, one `Generator.chat` call per distinct decoding
config in the batch. `max_batch_size: 1` turns batching off. Streaming requests generate alone (in
a thread) and send text pieces as the tokens come.

A batch is generated on the replica's event loop, blocking it, on purpose: Serve forms the next
batch as soon as the previous one starts, so a batch handler that yields while the model works
(e.g. `asyncio.to_thread`) gets batches of whatever arrived in the first milliseconds, mostly one
request. Blocking, the requests that arrive during a batch wait in the queue and the next batch
takes them all: 15 of 16 at once and 4x the requests/s in `benchmarks/serve_load.py`, against
2.1x with a thread. The cost: a streamed reply on the same replica pauses while a batch runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from PIL import Image
from ray import serve

from pixelray.generators import GenerationConfig, GenerationResult, Message, create_generator
from pixelray.generators.streaming import stream_reply

Item = tuple[list[Message], list[Image.Image], GenerationConfig]


@serve.deployment
class VLMModel:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01):
        self.generator = create_generator(model, device=device, dtype=dtype)
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
            for i, result in zip(indices, self._chat([items[i] for i in indices])):
                results[i] = result
        return results

    def _chat(self, items: list[Item]) -> list[GenerationResult | Exception]:
        """One batched call; if it fails, each item alone, so one bad request fails only itself."""
        try:
            return self.generator.chat([c for c, _, _ in items], [ims for _, ims, _ in items], items[0][2])
        except Exception as e:
            if len(items) == 1:
                return [e]
        return [self._chat([item])[0] for item in items]

    async def stream(self, conversation: list[Message], images: list[Image.Image],
                     config: GenerationConfig) -> AsyncIterator[str | GenerationResult]:
        pieces = stream_reply(self.generator, conversation, images, config)
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            yield piece

