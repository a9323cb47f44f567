"""The model deployment for vllm models: vLLM's async engine, one per replica.

No `@serve.batch` here: every request, streamed or not, joins the engine's running batch as soon as it
arrives, and leaves it when done (continuous batching). A request the ingress stops waiting for (its
client disconnected) is cancelled by Serve, and the cancellation aborts it inside the engine, freeing
its slot and its KV cache at once. The methods are those of VLMModel (model.py), so the ingress, the
seed API and /v1 are the same for both, and so are pixelray's series (pixelray.telemetry); the engine
exports its own beside them (ray_vllm_*).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from PIL import Image
from ray import serve

from pixelray import telemetry
from pixelray.generators import GenerationConfig, GenerationResult, ImageFit, Message, resolve_generator
from pixelray.generators.vllm import AsyncVLLMEngine


@serve.deployment
class VLLMModel:
    def __init__(self, model: str, dtype: str = "auto", name: str | None = None):
        self.engine = AsyncVLLMEngine(resolve_generator(model).source, dtype=dtype, name=model)
        self.name = name or model  # as clients call it: the metrics' `model`

    async def generate(self, conversation: list[Message], images: list[Image.Image],
                       config: GenerationConfig) -> GenerationResult:
        async for piece in self.stream(conversation, images, config):
            if isinstance(piece, GenerationResult):
                return piece
        raise AssertionError("the engine ended a request without a result")

    async def stream(self, conversation: list[Message], images: list[Image.Image],
                     config: GenerationConfig) -> AsyncIterator[str | GenerationResult]:
        reply = telemetry.Reply(self.name)
        async for piece in self.engine.stream(conversation, images, config):
            yield reply.saw(piece)

    def image_fit(self) -> ImageFit | None:
        return self.engine.prompts.image_fit

    async def stats(self) -> dict:
        """Requests in the engine now, running or waiting; those cancelled so far, and the last one's tokens."""
        return self.engine.stats()

    def __del__(self):
        self.engine.shutdown()
