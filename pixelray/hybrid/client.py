"""A client for LM Studio, or any OpenAI-compatible server (vLLM, Ollama, llama.cpp, mlx-vlm, pixelray).

    config = LMStudioConfig(base_url="http://localhost:1234/v1", model=None, timeout=60, max_retries=2)
    check_lm_studio_available(config)            # True when GET /models answers
    client = LMStudioClient(config)
    client.models()                              # ["qwen2.5-7b-instruct", ...]
    client.complete([{"role": "user", "content": "Hello"}], max_tokens=32).text

Requests go through the official `openai` SDK, with its retries: connection errors, timeouts and
HTTP 408, 409, 429 and 5xx are tried again up to `max_retries` times, after an exponential backoff
(0.5 s, 1 s, 2 s, ... with jitter) or the delay the server's Retry-After asks for. Whatever still
fails raises `LLMServerError` with the HTTP status a gateway would answer: 503 when the server cannot
be reached or is too slow, 502 when it answered with an error or with something that is not a chat
completion.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import openai
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelray.errors import PixelrayError

DEFAULT_BASE_URL = "http://localhost:1234/v1"  # LM Studio's local server


class LMStudioConfig(BaseModel):
    """Where the LLM is and how patiently to ask it. `model` None: the first model the server lists
    (LM Studio's loaded model). The API key, when the server wants one, comes from the environment
    (PIXELRAY_LLM_API_KEY) so that it never lands in a job manifest or a model name."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = DEFAULT_BASE_URL
    model: str | None = None
    api_key: str | None = Field(default_factory=lambda: os.environ.get("PIXELRAY_LLM_API_KEY") or None, repr=False,
                                exclude=True)
    timeout: float = Field(60.0, gt=0)  # seconds for one attempt
    max_retries: int = Field(2, ge=0)
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
    """The LLM server failed a request; `status` is what a gateway answers for it (502 or 503)."""

    status = 502
    code = "llm_server_error"


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
                                    timeout=self.config.timeout, max_retries=self.config.max_retries)
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
                                 f"({self.config.max_retries} retries)", 503) from None
        except openai.APIConnectionError as e:
            reason = e.__cause__ or e
            raise LLMServerError(f"the LLM server at {url} cannot be reached ({self.config.max_retries} retries): "
                                 f"{str(reason)[:300]}", 503) from None
        except openai.APIStatusError as e:
            raise LLMServerError(f"the LLM server at {url} answered HTTP {e.status_code}: {e.response.text[:300]}",
                                 502) from None
        except (openai.OpenAIError, ValueError) as e:  # an answer the SDK cannot read (not JSON, wrong shape)
            raise LLMServerError(f"the LLM server at {url} answered with a body that is not JSON it can use: "
                                 f"{str(e)[:200]}", 502) from None

    def models(self) -> list[str]:
        """The ids GET /models lists."""
        with self._failures("/models"):
            return [m.id for m in self.openai.models.list().data if isinstance(getattr(m, "id", None), str)]

    def model(self) -> str:
        """The configured model, or the first one the server lists (asked once)."""
        if self._model is None:
            models = self.models()
            if not models:
                raise LLMServerError(f"the LLM server at {self.config.base_url} lists no model: load one "
                                     "(in LM Studio) or name it with `model`", 502)
            self._model = models[0]
        return self._model

    def complete(self, messages: list[dict[str, Any]], max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[str] | None = None) -> Completion:
        """One chat completion (POST /chat/completions, not streamed)."""
        model = self.model()
        optional = {k: v for k, v in (("top_p", top_p), ("seed", seed), ("stop", stop or None)) if v is not None}
        with self._failures("/chat/completions"):
            answer = self.openai.chat.completions.create(
                model=model, messages=messages, stream=False, max_tokens=max_tokens or self.config.max_tokens,
                temperature=self.config.temperature if temperature is None else temperature, **optional)
        choices = getattr(answer, "choices", None)
        if not choices:
            raise LLMServerError(f"the LLM server answered without choices: {str(answer)[:200]}", 502)
        content = getattr(choices[0].message, "content", None) if getattr(choices[0], "message", None) else None
        if not isinstance(content, str):
            raise LLMServerError(f"the LLM server's first choice has no text content: {str(choices[0])[:200]}", 502)
        usage = answer.usage
        return Completion(text=content.strip(), finish_reason=str(choices[0].finish_reason or "stop"),
                          prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                          completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                          model=str(answer.model or model))


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
