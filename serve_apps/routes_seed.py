"""The seed API: one image in, text out (multipart), and a chat that keeps its conversation.

    GET  /health     no key needed
    POST /caption    multipart: image, prompt?, max_new_tokens?, model?
    POST /question   multipart: image, question, max_new_tokens?, model?
    POST /hybrid     multipart: image, prompt?, max_new_tokens?, temperature?, model? (a hybrid model)
    POST /chat       JSON: message, image_base64?, conversation_id?, model?, max_new_tokens?, temperature?
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from pixelray.errors import PixelrayError
from pixelray.generators import GenerationResult, user_turn
from pixelray.serve_apps.inputs import image_from_bytes, image_from_data_url
from pixelray.serve_apps.protocol import (CaptionForm, CaptionResponse, ChatRequest, ChatResponse, Health, HybridForm,
                                          QuestionForm, QuestionResponse)
from pixelray.serve_apps.server import Server, current

router = APIRouter()


@router.get("/health")
async def health(server: Server = Depends(current)) -> Health:
    return Health(models=list(server.models), encoders=list(server.encoders), stores=list(server.stores))


async def _ask(server: Server, request: Request, form_model: type[BaseModel], prompt: str,
               models: list[str] | None = None) -> tuple[Any, str, GenerationResult]:
    """A multipart request about one image -> (its form, the model's name, the reply); `models`: the
    ones this route may use (default: all), the first of them when the form names none."""
    form, data = await server.admission.form(request, form_model)
    image = await image_from_bytes(data, server.limits)
    name, handle = server.model(form.model, models)
    config = server.config(name, form.max_new_tokens, temperature=getattr(form, "temperature", 0.0))
    return form, name, await server.generate(handle, [user_turn(getattr(form, prompt))], [image], config)


@router.post("/caption")
async def caption(request: Request, server: Server = Depends(current)) -> CaptionResponse:
    _, name, result = await _ask(server, request, CaptionForm, "prompt")
    return CaptionResponse.of(name, result)


@router.post("/question")
async def question(request: Request, server: Server = Depends(current)) -> QuestionResponse:
    form, name, result = await _ask(server, request, QuestionForm, "question")
    return QuestionResponse(model=name, question=form.question, answer=result.text,
                            finish_reason=result.finish_reason, num_tokens=result.num_tokens)


@router.post("/hybrid")
async def hybrid(request: Request, server: Server = Depends(current)) -> CaptionResponse:
    """A caption from a hybrid model: the encoder's summarised features, written up by its LLM server."""
    server.admission.admit(request)  # the key first: without it, not even what is served here is told
    if not server.hybrid_models:
        raise PixelrayError("no hybrid model is served here: add one, e.g. models=[{name: hybrid, source: "
                            "'hybrid:clip?url=http://localhost:1234/v1'}]", 404, "model_not_found")
    _, name, result = await _ask(server, request, HybridForm, "prompt", server.hybrid_models)
    return CaptionResponse.of(name, result)


@router.post("/chat")
async def chat(request: Request, server: Server = Depends(current)) -> ChatResponse:
    body: ChatRequest = await server.admission.json(request, ChatRequest)
    image = await image_from_data_url(body.image_base64, server.limits, "image_base64") if body.image_base64 else None
    name, handle = server.model(body.model)
    config = server.config(name, body.max_new_tokens, temperature=body.temperature)
    cid, convo = server.conversations.open(body.conversation_id)
    user = user_turn(body.message, with_image=image is not None)
    images = convo.images + ([image] if image else [])
    try:
        if len(images) > server.args.max_images_per_request:
            raise PixelrayError(f"conversation {cid} holds {len(convo.images)} images, the most it may: start a new "
                                "one", 409, "too_many_images")
        result = await server.generate(handle, convo.messages + [user], images, config)
        if image is not None and (fit := await server.image_fit(name, handle)) is not None:
            image = await asyncio.to_thread(fit.apply, image)  # kept only as large as the model uses it
    except BaseException:
        server.conversations.release(convo)
        raise
    server.conversations.commit(cid, convo, user, image, result.text)
    return ChatResponse(conversation_id=cid, model=name, reply=result.text, turns=convo.turns,
                        finish_reason=result.finish_reason)
