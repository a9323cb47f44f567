"""The `remote` backend: a vision-language model behind OpenAI-compatible servers (vLLM's `vllm serve`,
SGLang, LM Studio, `mlx_vlm.server`, llama.cpp's server, pixelray's own /v1), sent the images themselves.

    gen = create_generator("remote:qwen2-vl?url=http://gpu1:8000/v1&url=http://gpu2:8000/v1")
    gen = create_generator("remote:?url=http://localhost:1234/v1")     # the model the server lists first
    gen.generate(images, "Describe the image.", GenerationConfig(max_new_tokens=64))

Each image goes inside `POST /chat/completions` as a base64 data URL (PNG, lossless, or `image_format=jpeg`),
scaled down first to `max_side` pixels on its longer side; the generation settings become OpenAI's fields
(max_tokens, temperature, top_p, seed, stop). Requests run concurrently, at most `max_in_flight` at a time
per generator, spread over the servers: each goes to the server with the fewest requests in flight. A server
that fails for a passing reason (not reached, too slow, HTTP 429 or 5xx, after the SDK's own retries) rests,
for `rest_s` seconds doubling while it keeps failing, and the request goes to another one; a resting server
is tried only when no other is left. A request that every server failed is a transient LLMServerError
(an error row that `--resume` retries). The API key comes from PIXELRAY_LLM_API_KEY, never from the name.

Settings (`remote:MODEL?key=value&...`): url (repeat it for several servers), max_side, image_format,
jpeg_quality, max_in_flight, rest_s, and the client's timeout, max_retries, max_retry_wait.

What a server offers, and whether each model takes images (`pixelray models --url URL`):

    discover("http://localhost:1234/v1")   # [ServedModel(id, images=True/False/None, how), ...]
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl

import httpx2
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelray.generators.base import GenerationConfig, GenerationResult, Message, ServerGenerator, count_images
from pixelray.generators.streaming import completion_result, settings_of, stream_completion
from pixelray.hybrid.client import Completion, LLMServerError, LMStudioClient, LMStudioConfig
from pixelray.images import ImageFit

T = TypeVar("T")
MAX_REST_S = 120.0  # the longest a failing server rests
# settings that say where and how patiently a model is asked, not what it generates (GeneratorSpec.identity)
OPERATIONAL = ("url", "max_in_flight", "rest_s", "timeout", "max_retries", "max_retry_wait")


class RemoteOptions(BaseModel):
    """What `remote:MODEL?...` says. `model` None: the first model each server lists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    urls: list[str] = Field(min_length=1)
    max_side: int = Field(1024, ge=16, le=8192)  # Qwen2-VL's default budget is about 1M pixels: 1024 x 1024
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(90, ge=1, le=100)
    max_in_flight: int = Field(16, ge=1, le=1024)
    rest_s: float = Field(5.0, gt=0)
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(2, ge=0)
    max_retry_wait: float = Field(10.0, gt=0)

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"a server is an http(s) URL such as http://localhost:8000/v1, not {url!r}")
        return [url.rstrip("/") for url in urls]

    @classmethod
    def from_source(cls, source: str) -> RemoteOptions:
        model, _, query = source.partition("?")
        settings: dict[str, Any] = {"model": model or None, "urls": []}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key == "url":
                settings["urls"].append(value)
            elif key in cls.model_fields and key not in ("model", "urls"):
                settings[key] = value
            else:
                known = sorted({"url", *cls.model_fields} - {"model", "urls"})
                raise ValueError(f"remote model {source!r}: unknown setting {key!r}; known: {', '.join(known)}")
        if not settings["urls"]:
            raise ValueError(f"remote model {source!r} names no server: add ?url=http://HOST:PORT/v1 (once per server)")
        return cls.model_validate(settings)

    def client_config(self, url: str) -> LMStudioConfig:
        return LMStudioConfig(base_url=url, model=self.model, timeout=self.timeout, max_retries=self.max_retries,
                              max_retry_wait=self.max_retry_wait, max_concurrency=self.max_in_flight)

    @property
    def image_fit(self) -> ImageFit:
        return ImageFit(long_side=self.max_side)


class Upstream:
    """One server: its client, the requests in flight to it, and how long it rests after failing."""

    def __init__(self, config: LMStudioConfig):
        self.client = LMStudioClient(config)
        self.url = config.base_url
        self.in_flight = self.sent = self.failures = 0
        self.rest_until = 0.0


class Fleet:
    """The servers of a remote model, and the choice of one for each request (see the module's docstring)."""

    def __init__(self, options: RemoteOptions):
        self.options = options
        self.upstreams = [Upstream(options.client_config(url)) for url in options.urls]
        self.lock = threading.Lock()

    def close(self) -> None:
        for u in self.upstreams:
            u.client.close()

    def order(self) -> list[Upstream]:
        """The servers to try, best first: those not resting, fewest in flight first, then the resting ones,
        the one whose rest ends first first."""
        now = time.monotonic()
        with self.lock:
            ready = sorted((u for u in self.upstreams if u.rest_until <= now), key=lambda u: (u.in_flight, u.sent))
            resting = sorted((u for u in self.upstreams if u.rest_until > now), key=lambda u: u.rest_until)
        return ready + resting

    def call(self, request: Callable[[LMStudioClient], T]) -> T:
        """`request(client)` on the best server; on a passing failure, that server rests and the next one is
        tried. The last failure is raised when every server failed (a lasting one at once)."""
        failure: LLMServerError | None = None
        for upstream in self.order():
            with self.lock:
                upstream.in_flight += 1
                upstream.sent += 1
            try:
                result = request(upstream.client)
            except LLMServerError as e:
                if not e.transient:
                    raise
                self._rest(upstream)
                failure = e
                continue
            finally:
                with self.lock:
                    upstream.in_flight -= 1
            with self.lock:
                upstream.failures, upstream.rest_until = 0, 0.0
            return result
        assert failure is not None
        raise failure

    def _rest(self, upstream: Upstream) -> None:
        with self.lock:
            upstream.failures += 1
            rest = min(MAX_REST_S, self.options.rest_s * 2 ** (upstream.failures - 1))
            upstream.rest_until = time.monotonic() + rest


def data_url(image: Image.Image, image_format: str = "png", quality: int = 90) -> str:
    """An image as a base64 data URL, as OpenAI's image_url parts carry it."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def to_openai_messages(conversation: list[Message], images: list[Image.Image],
                       options: RemoteOptions) -> list[dict[str, Any]]:
    """A conversation in the Hugging Face format, its images alongside -> OpenAI chat messages, each image part
    an image_url part with the (scaled down) image inline."""
    if count_images(conversation) != len(images):
        raise ValueError(f"the conversation has {count_images(conversation)} image parts but {len(images)} images")
    fit, pending = options.image_fit, iter(images)
    messages = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": data_url(
                fit.apply(next(pending)), options.image_format, options.jpeg_quality)}}
                if part.get("type") == "image" else {"type": "text", "text": part.get("text") or ""}
                for part in content]
        messages.append({"role": message["role"], "content": content})
    return messages


class RemoteGenerator(ServerGenerator):
    def __init__(self, source: str, name: str | None = None):
        self.options = RemoteOptions.from_source(source)
        self.name = name or f"remote:{source}"
        self.image_fit = self.options.image_fit
        self.fleet = Fleet(self.options)
        self.pool = ThreadPoolExecutor(self.options.max_in_flight, thread_name_prefix="remote")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.fleet.close()

    def chat_items(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult | Exception]:
        """Every conversation a request of its own, at most `max_in_flight` at a time (the images are encoded
        in the same threads); a failed request fails only its item."""
        if len(conversations) != len(images):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        settings = settings_of(config)

        def one(conversation: list[Message], ims: list[Image.Image]) -> GenerationResult | Exception:
            try:
                messages = to_openai_messages(conversation, ims, self.options)
                return completion_result(self.fleet.call(lambda client: client.complete(messages, **settings)))
            except (LLMServerError, ValueError) as e:
                return e
        return list(self.pool.map(one, conversations, images))

    def stream(self, conversation: list[Message], images: list[Image.Image],
               config: GenerationConfig = GenerationConfig(), cancel: threading.Event | None = None,
               on_cancelled: Callable[[int], None] | None = None) -> Iterator[str | GenerationResult]:
        """The upstream's streamed reply, passed on piece by piece as it arrives. A server that fails before
        its first piece is rested and the next one tried, as for a whole reply."""
        messages = to_openai_messages(conversation, images, self.options)
        settings = settings_of(config)
        first: dict[str, Any] = {}

        def opened(client: LMStudioClient) -> Iterator[str | Completion]:
            pieces = client.stream(messages, **settings)
            first["piece"] = next(pieces)  # the server answered: from here on, no other server is tried
            return pieces

        pieces = self.fleet.call(opened)
        yield from stream_completion(_prepend(first["piece"], pieces), cancel, on_cancelled)


def _prepend(piece: T, rest: Iterator[T]) -> Iterator[T]:
    try:
        yield piece
        yield from rest
    finally:
        rest.close()


@dataclass
class ServedModel:
    id: str
    images: bool | None  # whether it takes images; None: the listing does not say and the probe could not tell
    how: str  # where that comes from


def discover(url: str, probe: bool = True, timeout: float = 60.0) -> list[ServedModel]:
    """The models the server at `url` lists (GET /models), and whether each takes images: as its listing says
    (a `type` of vlm / llm / embeddings, as LM Studio's /api/v0/models and pixelray's /v1/models have it, or
    `input_modalities`), else, with `probe`, by asking it once about a tiny image. LLMServerError when the
    server does not answer."""
    client = LMStudioClient(LMStudioConfig(base_url=url, timeout=timeout, max_retries=1))
    try:
        entries = client.listing()
        types = _lm_studio_types(client)
        found = []
        for entry in entries:
            kind = entry.get("type") if entry.get("type") in ("vlm", "llm", "embeddings") else types.get(entry["id"])
            modalities = entry.get("input_modalities") or (entry.get("architecture") or {}).get("input_modalities")
            if kind is not None:
                found.append(ServedModel(entry["id"], kind == "vlm", f"listed as {kind}"))
            elif isinstance(modalities, list):
                found.append(ServedModel(entry["id"], "image" in modalities, f"listed: takes {', '.join(modalities)}"))
            elif probe:
                found.append(ServedModel(entry["id"], *_probe(client, entry["id"])))
            else:
                found.append(ServedModel(entry["id"], None, "not listed (not probed)"))
        return found
    finally:
        client.close()


def _lm_studio_types(client: LMStudioClient) -> dict[str, str]:
    """LM Studio's own listing (GET /api/v0/models beside /v1): model id -> vlm, llm or embeddings; {} elsewhere."""
    root = client.config.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {client.config.api_key}"} if client.config.api_key else {}
    try:
        answer = httpx2.get(f"{root}/api/v0/models", headers=headers, timeout=10).raise_for_status().json()
        return {m["id"]: m["type"] for m in answer["data"] if isinstance(m.get("id"), str)
                and m.get("type") in ("vlm", "llm", "embeddings")}
    except (httpx2.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _probe(client: LMStudioClient, model: str) -> tuple[bool | None, str]:
    """Ask `model` one token about an 8 x 8 image: an answer means it takes images, a refusal (HTTP 4xx) that it
    does not; anything else leaves it unknown."""
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": "Colour?"}]}]
    try:
        client.complete(messages, max_tokens=1, temperature=0.0, model=model)
        return True, "probed: it answered about an image"
    except LLMServerError as e:
        if e.transient:
            return None, f"probe failed: {e.message[:200]}"
        return False, f"probed: refused an image ({e.message[:200]})"
