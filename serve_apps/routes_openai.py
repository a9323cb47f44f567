"""The OpenAI-compatible API: text and image_url parts, n choices, stop, seed, and streaming as
server-sent events (a role chunk, content chunks as the tokens come, a finish chunk per choice, the
usage last when asked for, then [DONE]).

    GET  /v1/models
    POST /v1/chat/completions
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentHandle

from pixelray.errors import PixelrayError
from pixelray.generators import GenerationConfig, Message
from pixelray.serve_apps.inputs import openai_conversation
from pixelray.serve_apps.metering import note
from pixelray.serve_apps.protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChunkChoice,
                                          Delta, ErrorResponse, ModelList, Usage, completion_id)
from pixelray.serve_apps.server import Server, current, public_message

router = APIRouter(prefix="/v1")


@router.get("/models")
async def list_models(request: Request, server: Server = Depends(current)) -> ModelList:
    server.admission.admit(request)
    # the embedding models too, as OpenAI lists them
    return ModelList.of({**server.model_types, **{name: "embeddings" for name in server.encoders}})


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request, server: Server = Depends(current)) -> ChatCompletion | StreamingResponse:
    body: ChatCompletionRequest = await server.admission.json(request, ChatCompletionRequest)
    name, handle = server.model(body.model)
    conversation, images = await openai_conversation(body.messages, server.limits, server.args.image_url_allow_list,
                                                     server.args.max_images_per_request,
                                                     server.args.image_url_timeout_s)
    configs = [server.config(name, **settings) for settings in body.to_generation_settings()]
    if body.stream:
        server.check_prompt(conversation)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(handle, name, conversation, images, configs, include_usage),
                                 media_type="text/event-stream")
    results = await asyncio.gather(*(server.generate(handle, conversation, images, c) for c in configs))
    return ChatCompletion.of(name, list(results))


async def _events(handle: DeploymentHandle, model: str, conversation: list[Message], images: list,
                  configs: list[GenerationConfig], include_usage: bool) -> AsyncIterator[str]:
    cid, created = completion_id(), int(time.time())

    def chunk(index: int, delta: Delta, finish_reason: str | None = None) -> str:
        return ChatCompletionChunk(id=cid, created=created, model=model, choices=[
            ChunkChoice(index=index, delta=delta, finish_reason=finish_reason)]).event()

    results = []
    try:
        for index, config in enumerate(configs):
            yield chunk(index, Delta(role="assistant", content=""))
            async for piece in handle.options(stream=True).stream.remote(conversation, images, config):
                if isinstance(piece, str):
                    yield chunk(index, Delta(content=piece))
                else:
                    results.append(piece)
                    yield chunk(index, Delta(), piece.finish_reason)
        if include_usage:
            yield ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                      usage=Usage.of(results)).event()
    except Exception as e:  # the status line is sent already: report the error as an event
        error = PixelrayError(f"generation failed: {public_message(e)}", 500, "generation_failed")
        note(error=error.code)
        yield f"data: {ErrorResponse.of(error).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"
