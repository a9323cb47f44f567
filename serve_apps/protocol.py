"""What goes over the wire, typed: the seed API's requests and responses, OpenAI's chat-completions
protocol (as much of it as a vision-language model server needs), and the error body.

Our own requests are strict (an unknown form field is a 422); OpenAI requests are lenient (unknown
fields are accepted and ignored, as OpenAI-compatible servers do), and the values we use are
validated. Responses follow OpenAI's shapes, so the official `openai` client parses them unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelray.errors import PixelrayError
from pixelray.generators import DEFAULT_PROMPT, GenerationResult


def _omitted_if_none(value) -> bool:
    return value is None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- the seed API --------------------------------------------------------------------------------


class CaptionForm(Strict):
    """POST /caption (multipart, with an `image` file)."""

    prompt: str = Field(DEFAULT_PROMPT, min_length=1, max_length=2000)
    max_new_tokens: int = Field(64, ge=1)
    model: str | None = None


class QuestionForm(Strict):
    """POST /question (multipart, with an `image` file)."""

    question: str = Field(min_length=1, max_length=2000)
    max_new_tokens: int = Field(32, ge=1)
    model: str | None = None


class HybridForm(CaptionForm):
    """POST /hybrid (multipart, with an `image` file)."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)


class ChatRequest(Lenient):
    """POST /chat (JSON)."""

    message: str = Field(min_length=1, max_length=8000)
    image_base64: str | None = None  # a data URL: data:image/png;base64,...
    conversation_id: str | None = None
    model: str | None = None
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: list[str]


class CaptionResponse(BaseModel):
    """The answer of /caption and /hybrid."""

    model: str
    caption: str
    finish_reason: str
    num_tokens: int

    @classmethod
    def of(cls, model: str, result: GenerationResult) -> CaptionResponse:
        return cls(model=model, caption=result.text, finish_reason=result.finish_reason, num_tokens=result.num_tokens)


class QuestionResponse(BaseModel):
    model: str
    question: str
    answer: str
    finish_reason: str
    num_tokens: int


class ChatResponse(BaseModel):
    conversation_id: str
    model: str
    reply: str
    turns: int
    finish_reason: str


# --- OpenAI chat completions ------------------------------------------------------------------------


class ImageURL(Lenient):
    url: str
    detail: str | None = None


class ContentPart(Lenient):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(Lenient):
    include_usage: bool = False


class ChatCompletionRequest(Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field([], max_length=4)  # a string is a list of one
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v):
        return [v] if isinstance(v, str) else [] if v is None else v

    def to_generation_settings(self) -> list[dict]:
        """GenerationConfig's fields for each choice (`n`); choice i samples with seed + i."""
        return [{"max_new_tokens": self.max_completion_tokens or self.max_tokens or 256,
                 "temperature": self.temperature or 0.0, "top_p": self.top_p or 1.0, "stop": self.stop,
                 "seed": None if self.seed is None else self.seed + i} for i in range(self.n)]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, results: list[GenerationResult]) -> Usage:
        prompt = results[0].prompt_tokens if results else 0
        completion = sum(r.num_tokens for r in results)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage

    @classmethod
    def of(cls, model: str, results: list[GenerationResult]) -> ChatCompletion:
        return cls(model=model, usage=Usage.of(results), choices=[
            Choice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
            for i, r in enumerate(results)])


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_omitted_if_none)
    content: str | None = Field(None, exclude_if=_omitted_if_none)


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_omitted_if_none)  # the last chunk's, with include_usage

    def event(self) -> str:
        """As one server-sent event."""
        return f"data: {self.model_dump_json()}\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pixelray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

    @classmethod
    def of(cls, names: list[str]) -> ModelList:
        created = int(time.time())
        return cls(data=[ModelCard(id=n, created=created) for n in names])


# --- errors ------------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    code: str
    param: None = None


class ErrorResponse(BaseModel):
    """The body of every error: {"error": {"message", "type", "code", "param"}}, as OpenAI's."""

    error: ErrorInfo

    @classmethod
    def of(cls, error: PixelrayError) -> ErrorResponse:
        return cls(error=ErrorInfo(message=error.message, type=error.type, code=error.code))
