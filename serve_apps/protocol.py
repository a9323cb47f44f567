"""What goes over the wire, typed: the seed API's requests and responses, OpenAI's chat-completions and
embeddings protocols (as much of them as a vision-language model server needs), /search, and the error body.

Our own requests are strict (an unknown form field is a 422); OpenAI requests are lenient (unknown
fields are accepted and ignored, as OpenAI-compatible servers do), and the values we use are
validated. Responses follow OpenAI's shapes, so the official `openai` client parses them unchanged.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Literal

import numpy as np
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
    encoders: list[str] = []
    stores: list[str] = []


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


ModelType = Literal["vlm", "llm", "embeddings"]  # LM Studio's words for what a model takes and gives


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pixelray"
    type: ModelType  # vlm: takes images; llm: text only; embeddings: an encoder (`pixelray models --url` reads it)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

    @classmethod
    def of(cls, types: dict[str, ModelType]) -> ModelList:
        created = int(time.time())
        return cls(data=[ModelCard(id=n, created=created, type=t) for n, t in types.items()])


# --- embeddings (OpenAI's shapes) and search -----------------------------------------------------------


class EmbeddingRequest(Lenient):
    """POST /v1/embeddings: a text or a list of them; an input that is a data URL (data:image/...;base64,...)
    is an image. OpenAI's token-array inputs are refused with a 400 (an encoder has its own tokenizer)."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 unless told
    dimensions: int | None = Field(None, ge=1)  # accepted only when it is the encoder's own

    def inputs(self, max_inputs: int) -> list[str]:
        """The inputs as a list of non-empty strings: a 400 for none, an empty one or tokens, a 413 for too many."""
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items:
            raise PixelrayError("input is empty: give a text, a data URL or a list of them", 400, "empty_input")
        if not all(isinstance(x, str) for x in items):
            raise PixelrayError("token inputs are not supported: send the texts themselves", 400, "token_input")
        if len(items) > max_inputs:
            raise PixelrayError(f"{len(items)} inputs in one request; at most {max_inputs}", 413, "too_many_inputs")
        for i, text in enumerate(items):
            if not text.strip():
                raise PixelrayError(f"input[{i}] is an empty string", 400, "empty_input")
        return items


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the float32 values' little-endian bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage

    @classmethod
    def of(cls, model: str, vectors: np.ndarray, tokens: int, encoding_format: str) -> EmbeddingResponse:
        if encoding_format == "base64":
            values = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            values = vectors.astype(np.float32).tolist()
        return cls(model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
                   data=[Embedding(index=i, embedding=v) for i, v in enumerate(values)])


class SearchRequest(Strict):
    """POST /search: one query, a text or an image (a data URL or bare base64), against a store's index."""

    text: str | None = None
    image: str | None = None
    k: int | None = Field(None, ge=1)  # default: 10, or the server's max_search_k when that is lower
    store: str | None = None  # needed when the server searches more than one store

    def query(self) -> str:
        """The one query given (a 400 for both, neither, or an empty text)."""
        if (self.text is None) == (self.image is None):
            raise PixelrayError("give exactly one of `text` and `image`", 400, "invalid_query")
        if self.text is not None and not self.text.strip():
            raise PixelrayError("the text query is empty", 400, "empty_query")
        return self.text if self.text is not None else self.image  # type: ignore[return-value]


class SearchHit(BaseModel):
    """One result: the row's image_id (null for a text row about no image), path and cosine score, then its
    kept columns (caption, url, text, ...)."""

    model_config = ConfigDict(extra="allow")

    image_id: str | None
    path: str | None
    score: float | None


class SearchResponse(BaseModel):
    store: str
    model: str  # the encoder that embedded the query
    results: list[SearchHit]


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
