"""A client for LM Studio, or any OpenAI-compatible server (vLLM, Ollama, llama.cpp, mlx-vlm, pixelray).

    config = LMStudioConfig(base_url="http://localhost:1234/v1", model=None, timeout=60, max_retries=2)
    check_lm_studio_available(config)            # True when GET /models answers
    client = LMStudioClient(config)
    client.models()                              # ["qwen2.5-7b-instruct", ...]
    client.complete([{"role": "user", "content": "Hello"}], max_tokens=32).text

Retries are urllib3's (through a requests session): connection errors, timeouts and HTTP 429/5xx
are tried again up to `max_retries` times, waiting `retry_delay` * 2**(n-1) seconds before the nth
retry after the first (and honouring Retry-After). Whatever still fails raises `LLMServerError`
with the HTTP status a gateway would answer: 503 when the server cannot be reached or is too slow,
502 when it answered with an error or with something that is not a chat completion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from pydantic import BaseModel, ConfigDict, Field, field_validator
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

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
    timeout: float = Field(60.0, gt=0)  # seconds for one attempt (connect and each read)
    max_retries: int = Field(2, ge=0)
    retry_delay: float = Field(0.5, ge=0)  # backoff factor, seconds
    max_concurrency: int = Field(4, ge=1)  # requests in flight at once, per client
    max_tokens: int = Field(256, ge=1)  # defaults of HybridPixelLLM.generate
    temperature: float = Field(0.7, ge=0, le=2)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL}, not {value!r}")
        return value.rstrip("/")


class LLMServerError(RuntimeError):
    """The LLM server failed a request; `status` is what a gateway answers for it (502 or 503)."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keeps `status` across Ray's pickling
        return type(self), (str(self), self.status)


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
        retry = Retry(total=self.config.max_retries, backoff_factor=self.config.retry_delay,
                      status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None, raise_on_status=False)
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=self.config.max_concurrency)
        self.session = requests.Session()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if self.config.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.config.api_key}"
        self._model = self.config.model

    def close(self) -> None:
        self.session.close()

    def _request(self, method: str, path: str, **kwargs) -> Any:
        url = f"{self.config.base_url}{path}"
        try:
            response = self.session.request(method, url, timeout=self.config.timeout, **kwargs)
        except requests.RequestException as e:
            if not _timed_out(e):
                raise LLMServerError(f"the LLM server at {url} cannot be reached ({self.config.max_retries} retries): "
                                     f"{str(e)[:300]}", 503) from None
            raise LLMServerError(f"the LLM server at {url} did not answer within {self.config.timeout:g} s "
                                 f"({self.config.max_retries} retries)", 503) from None
        if response.status_code >= 400:
            raise LLMServerError(f"the LLM server at {url} answered HTTP {response.status_code}: "
                                 f"{response.text[:300]}", 502)
        try:
            return response.json()
        except ValueError:
            raise LLMServerError(f"the LLM server at {url} answered {response.status_code} with a body that is not "
                                 f"JSON: {response.text[:200]!r}", 502) from None

    def models(self) -> list[str]:
        """The ids GET /models lists."""
        body = self._request("GET", "/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise LLMServerError(f"GET {self.config.base_url}/models answered without a `data` list: "
                                 f"{str(body)[:200]}", 502)
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

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
        body = {"model": self.model(), "messages": messages, "stream": False,
                "max_tokens": max_tokens or self.config.max_tokens,
                "temperature": self.config.temperature if temperature is None else temperature}
        body.update({k: v for k, v in (("top_p", top_p), ("seed", seed)) if v is not None})
        if stop:
            body["stop"] = stop
        answer = self._request("POST", "/chat/completions", json=body)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise LLMServerError(f"the LLM server answered without choices: {str(answer)[:200]}", 502)
        content = (choices[0].get("message") or {}).get("content")
        if not isinstance(content, str):
            raise LLMServerError(f"the LLM server's first choice has no text content: {str(choices[0])[:200]}", 502)
        usage = answer.get("usage") or {}
        return Completion(text=content.strip(), finish_reason=str(choices[0].get("finish_reason") or "stop"),
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0),
                          model=str(answer.get("model") or body["model"]))


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


def _timed_out(error: requests.RequestException) -> bool:
    """A timeout, raised as such or, after the retries ran out, as the reason of a MaxRetryError."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    refused = isinstance(reason, urllib3.exceptions.NewConnectionError)  # a subclass of the timeouts, oddly
    return isinstance(error, requests.Timeout) or isinstance(reason, urllib3.exceptions.TimeoutError) and not refused
