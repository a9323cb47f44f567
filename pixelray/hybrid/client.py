"""A client for LM Studio, or any OpenAI-compatible server (vLLM, Ollama, llama.cpp, mlx-vlm, pixelray).

    config = LMStudioConfig(base_url="http://localhost:1234/v1", model=None, timeout=60, max_retries=2)
    check_lm_studio_available(config)            # True when GET /models answers
    client = LMStudioClient(config)
    client.models()                              # ["qwen2.5-7b-instruct", ...]
    client.complete([{"role": "user", "content": "Hello"}], max_tokens=32).text
    for piece in client.stream(messages, max_tokens=32): ...   # text deltas as they come, then the Completion

Requests go through the official `openai` SDK, with its retries: connection errors, timeouts and
HTTP 408, 409, 429 and 5xx are tried again up to `max_retries` times, after an exponential backoff
(0.5 s, 1 s, 2 s, ... with jitter) or the delay the server's Retry-After asks for, at most
`max_retry_wait` seconds. Whatever still fails raises `LLMServerError` with the HTTP status a gateway
would answer: 503 when the server cannot be reached or is too slow, 502 when it answered with an
error, with a body over MAX_BODY_BYTES, or with something that is not a chat completion (not JSON, or
JSON of another shape: `choices` not a list, `usage` not an object, ...). A failure that passes by
itself (not reached, too slow, HTTP 429 or 5xx) is `transient`.
"""

from __future__ import annotations

import email.utils
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import httpx2
import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pixelray.errors import PixelrayError, validation_message

DEFAULT_BASE_URL = "http://localhost:1234/v1"  # LM Studio's local server
API_KEY_ENV = "PIXELRAY_LLM_API_KEY"  # where the key of a server that wants one comes from
MAX_BODY_BYTES = 8 * 1024 * 1024  # an answer past this is refused while it is read (a chat completion is KBs)


class LMStudioConfig(BaseModel):
    """Where the LLM is and how patiently to ask it. `model` None: the first model the server lists
    (LM Studio's loaded model). The API key, when the server wants one, comes from the environment
    (PIXELRAY_LLM_API_KEY) so that it never lands in a job manifest or a model name."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = DEFAULT_BASE_URL
    model: str | None = None
    api_key: str | None = Field(default_factory=lambda: os.environ.get(API_KEY_ENV) or None, repr=False,
                                exclude=True)
    timeout: float = Field(60.0, gt=0)  # seconds for one attempt
    max_retries: int = Field(2, ge=0)
    max_retry_wait: float = Field(10.0, gt=0)  # seconds before a retry at most, whatever Retry-After asks
    max_concurrency: int = Field(4, ge=1)  # requests in flight at once, per client
    max_tokens: int = Field(256, ge=1)  # defaults of HybridPixelLLM.generate
    temperature: float = Field(0.7, ge=0, le=2)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL}, not {value!r}")
        return value.rstrip("/")


class LLMServerError(PixelrayError):
    """The LLM server failed a request; `status` is what a gateway answers for it (502 or 503).
    `transient`: the failure passes by itself (not reached, too slow, HTTP 429 or 5xx): worth retrying later."""

    status = 502
    code = "llm_server_error"

    def __init__(self, message: str, status: int | None = None, code: str | None = None, transient: bool = False):
        super().__init__(message, status, code)
        self.transient = transient

    def __reduce__(self):  # status, code and transient survive Ray's pickling
        return type(self), (self.message, self.status, self.code, self.transient)


class BodyTooLargeError(openai.OpenAIError):
    """An answer over MAX_BODY_BYTES (an OpenAIError, so the SDK passes it on at once, without retrying)."""


class _CappedStream(httpx2.SyncByteStream):
    def __init__(self, stream: httpx2.SyncByteStream, limit: int):
        self.stream, self.limit = stream, limit

    def __iter__(self) -> Iterator[bytes]:
        read = 0
        for chunk in self.stream:
            read += len(chunk)
            if read > self.limit:
                raise BodyTooLargeError(f"the answer is over {self.limit:,} bytes")
            yield chunk

    def close(self) -> None:
        self.stream.close()


def _retry_after(headers: httpx2.Headers) -> float | None:
    """The wait a Retry-After (or retry-after-ms) header asks for, in seconds, as the SDK reads it."""
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return float(headers[name]) / divisor
        except (KeyError, ValueError):
            continue
    date = email.utils.parsedate_tz(headers.get("retry-after", ""))
    return email.utils.mktime_tz(date) - time.time() if date else None


def _http_client(config: LMStudioConfig) -> httpx2.Client:
    """The SDK's own httpx client with two bounds: the body of an answer is read up to MAX_BODY_BYTES
    (uncompressed: `Accept-Encoding: identity`), and a Retry-After longer than `max_retry_wait` is
    shortened to it."""
    def bound(response: httpx2.Response) -> None:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            response.close()
            raise BodyTooLargeError(f"the answer declares {int(declared):,} bytes, over {MAX_BODY_BYTES:,}")
        response.stream = _CappedStream(response.stream, MAX_BODY_BYTES)
        wait = _retry_after(response.headers)
        if wait is not None and not 0 <= wait <= config.max_retry_wait:  # (inf and nan too)
            response.headers.pop("retry-after-ms", None)
            response.headers["retry-after"] = f"{config.max_retry_wait:g}"

    return openai.DefaultHttpxClient(headers={"Accept-Encoding": "identity"}, event_hooks={"response": [bound]})


class _Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Message(BaseModel):
    content: Any = None


class _Choice(BaseModel):
    message: _Message | None = None
    finish_reason: str | None = None


class _ChatAnswer(BaseModel):
    """The parts of a chat completion read here; other fields are ignored, these must have their types."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    model: str | None = None


class _ModelList(BaseModel):
    data: list[dict[str, Any]]


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str


class LMStudioClient:
    def __init__(self, config: LMStudioConfig | None = None):
        self.config = config or LMStudioConfig()
        # servers that want no key still get a bearer header: the SDK needs some key
        self.openai = openai.OpenAI(base_url=self.config.base_url, api_key=self.config.api_key or "none",
                                    timeout=self.config.timeout, max_retries=self.config.max_retries,
                                    http_client=_http_client(self.config))
        self._model = self.config.model

    def close(self) -> None:
        self.openai.close()

    @contextmanager
    def _failures(self, path: str):
        """The SDK's errors, after its retries, as LLMServerError (503: not reached or too slow; 502: a bad answer)."""
        url = f"{self.config.base_url}{path}"
        try:
            yield
        except openai.APITimeoutError:
            raise LLMServerError(f"the LLM server at {url} did not answer within {self.config.timeout:g} s "
                                 f"({self.config.max_retries} retries)", 503, transient=True) from None
        except openai.APIConnectionError as e:
            reason = e.__cause__ or e
            raise LLMServerError(f"the LLM server at {url} cannot be reached ({self.config.max_retries} retries): "
                                 f"{str(reason)[:300]}", 503, transient=True) from None
        except openai.APIStatusError as e:
            raise LLMServerError(f"the LLM server at {url} answered HTTP {e.status_code}: {e.response.text[:300]}",
                                 502, transient=e.status_code == 429 or e.status_code >= 500) from None
        except openai.APIError as e:  # an error event in a stream
            raise LLMServerError(f"the LLM server at {url} reported an error in its stream: {str(e)[:300]}",
                                 502) from None
        except httpx2.TransportError as e:  # the connection broke while a stream was read
            raise LLMServerError(f"the LLM server at {url} broke off its answer: {str(e)[:300]}", 503,
                                 transient=True) from None
        except BodyTooLargeError as e:
            raise LLMServerError(f"the LLM server at {url} answered too much: {e}", 502) from None
        except ValidationError as e:  # JSON, but not of the shape asked for
            raise LLMServerError(f"the LLM server at {url} answered with JSON that is not what {path} returns: "
                                 f"{validation_message(e)[:300]}", 502) from None
        except (openai.OpenAIError, ValueError) as e:  # an answer that cannot be read (not JSON)
            raise LLMServerError(f"the LLM server at {url} answered with a body that is not JSON it can use: "
                                 f"{str(e)[:200]}", 502) from None

    def listing(self) -> list[dict[str, Any]]:
        """The entries GET /models lists (each with a string `id`), as the server wrote them."""
        with self._failures("/models"):
            answer = _ModelList.model_validate(self.openai.models.with_raw_response.list().http_response.json())
        return [m for m in answer.data if isinstance(m.get("id"), str)]

    def models(self) -> list[str]:
        """The ids GET /models lists."""
        return [m["id"] for m in self.listing()]

    def model(self) -> str:
        """The configured model, or the first one the server lists (asked once)."""
        if self._model is None:
            models = self.models()
            if not models:
                raise LLMServerError(f"the LLM server at {self.config.base_url} lists no model: load one "
                                     "(in LM Studio) or name it with `model`", 502)
            self._model = models[0]
        return self._model

    def _settings(self, max_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None,
                  stop: list[str] | None, model: str | None) -> dict[str, Any]:
        """A request's fields besides the messages: the model, and OpenAI's generation settings."""
        optional = {k: v for k, v in (("top_p", top_p), ("seed", seed), ("stop", stop or None)) if v is not None}
        return dict(model=model or self.model(), max_tokens=max_tokens or self.config.max_tokens,
                    temperature=self.config.temperature if temperature is None else temperature, **optional)

    def complete(self, messages: list[dict[str, Any]], max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[str] | None = None, model: str | None = None) -> Completion:
        """One chat completion (POST /chat/completions, not streamed), from `model` (default: the configured
        one, or the first the server lists)."""
        settings = self._settings(max_tokens, temperature, top_p, seed, stop, model)
        model = settings["model"]
        with self._failures("/chat/completions"):
            raw = self.openai.chat.completions.with_raw_response.create(messages=messages, stream=False, **settings)
            answer = _ChatAnswer.model_validate(raw.http_response.json())
        if not answer.choices:
            raise LLMServerError(f"the LLM server answered without choices: {str(answer)[:200]}", 502)
        first = answer.choices[0]
        content = first.message.content if first.message else None
        if not isinstance(content, str):
            raise LLMServerError(f"the LLM server's first choice has no text content: {str(first)[:200]}", 502)
        usage = answer.usage or _Usage()
        return Completion(text=content.strip(), finish_reason=first.finish_reason or "stop",
                          prompt_tokens=usage.prompt_tokens or 0, completion_tokens=usage.completion_tokens or 0,
                          model=answer.model or model)

    def stream(self, messages: list[dict[str, Any]], max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
               stop: list[str] | None = None, model: str | None = None) -> Iterator[str | Completion]:
        """One chat completion, streamed: its text deltas as the server sends them, then the Completion (the
        whole text, stripped; the usage when the server reports it, else the number of content chunks).
        Closing the iterator closes the connection, which stops a server that cancels on disconnect."""
        settings = self._settings(max_tokens, temperature, top_p, seed, stop, model)
        texts: list[str] = []
        finish, usage, chunks = "stop", _Usage(), 0
        with self._failures("/chat/completions"):
            stream = self.openai.chat.completions.create(messages=messages, stream=True,
                                                         stream_options={"include_usage": True}, **settings)
            with stream:
                for chunk in stream:
                    try:
                        if chunk.usage is not None:
                            usage = _Usage.model_validate(chunk.usage.model_dump())
                        choice = chunk.choices[0] if chunk.choices else None
                        delta = choice.delta.content if choice is not None and choice.delta is not None else None
                    except (AttributeError, TypeError, IndexError) as e:
                        raise ValueError(f"a chunk that is not a chat completion chunk: {e}") from None
                    if choice is not None and choice.finish_reason:
                        finish = choice.finish_reason
                    if isinstance(delta, str) and delta:
                        texts.append(delta)
                        chunks += 1
                        yield delta
        yield Completion(text="".join(texts).strip(), finish_reason=finish, prompt_tokens=usage.prompt_tokens or 0,
                         completion_tokens=usage.completion_tokens or chunks, model=settings["model"])


def check_lm_studio_available(config: LMStudioConfig | None = None, timeout: float = 5.0) -> bool:
    """Whether the server answers GET /models now (one quick try, no retries)."""
    config = (config or LMStudioConfig()).model_copy(update={"max_retries": 0, "timeout": timeout})
    client = LMStudioClient(config)
    try:
        client.models()
        return True
    except LLMServerError:
        return False
    finally:
        client.close()
