"""The HTTP ingress: FastAPI routes in front of the model deployments (DeploymentHandles).

    POST /caption               multipart: image, prompt?, max_new_tokens?, model?
    POST /question              multipart: image, question, max_new_tokens?, model?
    POST /chat                  JSON: message, image_base64?, conversation_id?, model?, max_new_tokens?
    POST /hybrid                multipart: image, prompt?, max_new_tokens?, temperature?, model? (a hybrid model)
    GET  /health                no key needed
    GET  /v1/models             OpenAI-compatible
    POST /v1/chat/completions   OpenAI-compatible: text and image_url parts, stream, n, stop, seed, ...

Every error is a JSON body {"error": {"message", "type", "code"}} with a 4xx status for bad input
(400 unreadable, 401 key, 404 model, 409 conversation, 413 too big, 422 bad values), 503 when
the models are overloaded, and for a hybrid model 503 when its LLM server cannot be reached or is
too slow, 502 when it answers with an error or garbage. Bodies are parsed here, not by FastAPI,
so that the size limit and the API key are checked before a byte of a large upload is read.
"""


import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from pixelray.generators import GenerationConfig, GenerationResult, user_turn
from pixelray.hybrid.client import LLMServerError
from pixelray.images import ImageLimits
from serve_apps import protocol
from serve_apps.conversations import ConversationError, ConversationStore
from serve_apps.inputs import APIError, image_from_bytes, image_from_data_url, openai_conversation

logger = logging.getLogger("ray.serve")
app = FastAPI(title="pixelray", description="caption, VQA, chat and OpenAI-compatible endpoints")


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(status, message, code), status_code=status, headers=headers)


@app.exception_handler(APIError)
async def _api_error(_, e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 503 else None
    return _error(e.status, e.message, e.code, headers)


@app.exception_handler(HTTPException)
async def _http_error(_, e: HTTPException) -> JSONResponse:
    return _error(e.status_code, str(e.detail))


def _describe(errors: list[dict]) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in err['loc'] if x != 'body') or 'body'}: {err['msg']}"
                     for err in errors)


def _caption_body(model: str, result: GenerationResult) -> dict:
    """The answer of /caption and /hybrid."""
    return {"model": model, "caption": result.text, "finish_reason": result.finish_reason,
            "num_tokens": result.num_tokens}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class IngressSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str | None = None
    image_url_hosts: list[str] = []
    max_request_bytes: int = 25 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_images_per_request: int = 4
    max_new_tokens: dict[str, int] = {}  # model name -> the most a request may ask for
    chat_max_turns: int = 16
    chat_max_conversations: int = 1024
    chat_ttl_s: float = 3600.0
    retries: int = 2  # a request whose replica died is sent again, this many times
    hybrid_models: list[str] = []  # the models /hybrid may use (backend hybrid), the first by default


class CaptionForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("Describe the image.", min_length=1, max_length=2000)
    max_new_tokens: int = Field(64, ge=1)
    model: str | None = None


class QuestionForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=2000)
    max_new_tokens: int = Field(32, ge=1)
    model: str | None = None


class HybridForm(CaptionForm):
    temperature: float = Field(0.0, ge=0.0, le=2.0)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: str = Field(min_length=1, max_length=8000)
    image_base64: str | None = None  # a data URL: data:image/png;base64,...
    conversation_id: str | None = None
    model: str | None = None
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise APIError(422, _describe(e.errors()), "invalid_parameters") from None


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, models: dict[str, DeploymentHandle], settings: IngressSettings):
        self.models, self.settings = models, settings
        self.default_model = next(iter(models))
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.conversations = ConversationStore(settings.chat_max_conversations, settings.chat_max_turns,
                                               settings.chat_ttl_s)

    # --- admission, parsing, model calls -------------------------------------------------------

    def _admit(self, request: Request) -> None:
        """The API key (when one is configured) and the request size, before the body is read."""
        if self.settings.api_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.settings.api_key):
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.settings.max_request_bytes:
            raise APIError(413, f"request body is {int(length):,} bytes, over the limit of "
                                f"{self.settings.max_request_bytes:,}", "request_too_large")

    async def _json(self, request: Request, model: type[BaseModel]) -> Any:
        self._admit(request)
        body = await request.body()
        if len(body) > self.settings.max_request_bytes:
            raise APIError(413, f"request body is over the limit of {self.settings.max_request_bytes:,} bytes",
                           "request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", "invalid_json")
        return _validated(model, data)

    async def _form(self, request: Request, model: type[BaseModel]) -> tuple[Any, bytes]:
        """A multipart form: its `image` file's bytes and the other fields validated by `model`."""
        self._admit(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "send multipart/form-data with an 'image' file field", "not_multipart")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except HTTPException as e:
            raise APIError(400, f"unreadable multipart form: {e.detail}", "bad_form") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise APIError(422, "the 'image' file field is missing", "missing_image")
        data = await upload.read(self.settings.max_image_bytes + 1)
        fields = {k: v for k, v in form.items() if k != "image" and v != ""}
        return _validated(model, fields), data

    def _model(self, name: str | None) -> tuple[str, DeploymentHandle]:
        name = name or self.default_model
        if name not in self.models:
            raise APIError(404, f"model {name!r} is not served here; models: {', '.join(self.models)}",
                           "model_not_found")
        return name, self.models[name]

    def _config(self, model: str, max_new_tokens: int, **kwargs) -> GenerationConfig:
        limit = self.settings.max_new_tokens.get(model, 512)
        if max_new_tokens > limit:
            raise APIError(422, f"max tokens {max_new_tokens} is over this server's limit of {limit} for {model}",
                           "max_tokens_too_large")
        return _validated(GenerationConfig, {"max_new_tokens": max_new_tokens, **kwargs})

    async def _generate(self, handle: DeploymentHandle, conversation, images, config) -> GenerationResult:
        """One reply; a request whose replica died is retried on another, an overload is a 503, a
        ValueError from the model (an input it cannot take) a 400, and a hybrid's LLM server failing
        its LLMServerError's status (502 or 503)."""
        for attempt in range(self.settings.retries + 1):
            try:
                return await handle.generate.remote(conversation, images, config)
            except BackPressureError:
                raise APIError(503, "the model is overloaded: retry shortly", "overloaded") from None
            except RayActorError as e:
                if attempt == self.settings.retries:
                    raise APIError(503, "the model replica failed; retry shortly", "replica_failed") from None
                logger.warning("a model replica died during a request (%s); sending it again", type(e).__name__)
            except LLMServerError as e:
                raise APIError(e.status, str(e), "llm_server_error") from None
            except ValueError as e:
                raise APIError(400, f"the model refused the input: {e}", "model_input") from None
        raise AssertionError("unreachable")

    # --- seed API -----------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "models": list(self.models)}

    async def _ask(self, request: Request, form_model: type[BaseModel], prompt_field: str,
                   models: list[str] | None = None) -> tuple[Any, str, GenerationResult]:
        """A multipart request about one image -> (its form, the model's name, the reply); `models`:
        the ones this route may use (default: all), the first of them when the form names none."""
        form, data = await self._form(request, form_model)
        image = image_from_bytes(data, self.limits)
        if models is not None and form.model is not None and form.model not in models:
            raise APIError(404, f"model {form.model!r} cannot serve this route; use one of {', '.join(models)}",
                           "model_not_found")
        name, handle = self._model(form.model or (models[0] if models else None))
        result = await self._generate(handle, [user_turn(getattr(form, prompt_field))], [image],
                                      self._config(name, form.max_new_tokens,
                                                   temperature=getattr(form, "temperature", 0.0)))
        return form, name, result

    @app.post("/caption")
    async def caption(self, request: Request) -> dict:
        _, name, result = await self._ask(request, CaptionForm, "prompt")
        return _caption_body(name, result)

    @app.post("/question")
    async def question(self, request: Request) -> dict:
        form, name, result = await self._ask(request, QuestionForm, "question")
        return {"model": name, "question": form.question, "answer": result.text,
                "finish_reason": result.finish_reason, "num_tokens": result.num_tokens}

    @app.post("/hybrid")
    async def hybrid(self, request: Request) -> dict:
        """A caption from a hybrid model: the encoder's summarised features, written up by its LLM server."""
        if not self.settings.hybrid_models:
            raise APIError(404, "no hybrid model is served here: add one, e.g. models=[{name: hybrid, source: "
                                "'hybrid:clip?url=http://localhost:1234/v1'}]", "model_not_found")
        _, name, result = await self._ask(request, HybridForm, "prompt", self.settings.hybrid_models)
        return _caption_body(name, result)

    @app.post("/chat")
    async def chat(self, request: Request) -> dict:
        body: ChatRequest = await self._json(request, ChatRequest)
        image = image_from_data_url(body.image_base64, self.limits, "image_base64") if body.image_base64 else None
        name, handle = self._model(body.model)
        config = self._config(name, body.max_new_tokens, temperature=body.temperature)
        try:
            cid, convo = self.conversations.open(body.conversation_id)
        except ConversationError as e:
            raise APIError(e.status, str(e), "conversation") from None
        user = user_turn(body.message, with_image=image is not None)
        images = convo.images + ([image] if image else [])
        try:
            if len(images) > self.settings.max_images_per_request:
                raise APIError(409, f"conversation {cid} holds {len(convo.images)} images, the most it may: start a "
                                    "new one", "too_many_images")
            result = await self._generate(handle, convo.messages + [user], images, config)
        except BaseException:
            self.conversations.release(convo)
            raise
        self.conversations.commit(cid, convo, user, image, result.text)
        return {"conversation_id": cid, "model": name, "reply": result.text, "turns": convo.turns,
                "finish_reason": result.finish_reason}

    # --- OpenAI-compatible API ----------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._admit(request)
        return protocol.model_list(list(self.models))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, request: Request) -> dict | StreamingResponse:
        body: protocol.ChatCompletionRequest = await self._json(request, protocol.ChatCompletionRequest)
        name, handle = self._model(body.model)
        conversation, images = await openai_conversation(body.messages, self.limits, self.settings.image_url_hosts,
                                                         self.settings.max_images_per_request)
        base = dict(temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, stop=body.stop)
        configs = [self._config(name, body.max_completion_tokens or body.max_tokens or 256, **base,
                                seed=None if body.seed is None else body.seed + i) for i in range(body.n)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(handle, name, conversation, images, configs, include_usage),
                                     media_type="text/event-stream")
        results = await asyncio.gather(*(self._generate(handle, conversation, images, c) for c in configs))
        return protocol.chat_completion(name, list(results))

    async def _sse(self, handle: DeploymentHandle, name: str, conversation, images, configs: list[GenerationConfig],
                   include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, content chunks as tokens come, a finish chunk per choice."""
        cid, created = protocol.completion_id(), int(time.time())
        results = []
        try:
            for index, config in enumerate(configs):
                yield _event(protocol.chunk(cid, name, index, {"role": "assistant", "content": ""}, None, created))
                async for piece in handle.options(stream=True).stream.remote(conversation, images, config):
                    if isinstance(piece, str):
                        yield _event(protocol.chunk(cid, name, index, {"content": piece}, None, created))
                    else:
                        results.append(piece)
                        yield _event(protocol.chunk(cid, name, index, {}, piece.finish_reason, created))
            if include_usage:
                yield _event({**protocol.chunk(cid, name, 0, {}, None, created), "choices": [],
                              "usage": protocol.usage(results)})
        except Exception as e:  # the status line is sent already: report the error as an event
            yield _event(protocol.error_body(500, f"generation failed: {e}"))
        yield "data: [DONE]\n\n"
