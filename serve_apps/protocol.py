"""The OpenAI chat-completions protocol, as much of it as a vision-language model server needs.

Requests are lenient (unknown fields are accepted and ignored, as OpenAI-compatible servers do);
the values we use are validated (a bad one is a 422). Responses follow OpenAI's shapes, so the
official `openai` client parses them unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelray.generators import GenerationResult


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


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


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.num_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(model: str, results: list[GenerationResult]) -> dict:
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                     "finish_reason": r.finish_reason, "logprobs": None} for i, r in enumerate(results)],
        "usage": usage(results),
    }


def chunk(cid: str, model: str, index: int, delta: dict, finish_reason: str | None = None,
          created: int | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created or int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def model_list(names: list[str]) -> dict:
    created = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "pixelray"}
                                       for n in names]}


def error_body(status: int, message: str, code: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code or str(status), "param": None}}
