"""What the routes share in the ingress replica: the app's settings, admission, the model, encoder and
store deployments and how a request reaches one (lookup, token limit, retries), and the /chat
conversations."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import Request
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from pixelray.errors import PixelrayError
from pixelray.generators import GenerationConfig, GenerationResult, ImageFit, Message
from pixelray.serve_apps.admission import Admission, validated
from pixelray.serve_apps.conversations import ConversationStore
from pixelray.serve_apps.metering import note
from pixelray.serve_apps.settings import AppArgs

if TYPE_CHECKING:  # the encoder's module loads torch and the batch jobs' modules: not needed here
    from pixelray.serve_apps.embedder import EncoderInfo

logger = logging.getLogger("ray.serve")


class Server:
    def __init__(self, models: dict[str, DeploymentHandle], args: AppArgs, hybrid_models: list[str],
                 encoders: dict[str, DeploymentHandle] | None = None, stores: dict[str, DeploymentHandle] | None = None,
                 store_encoders: dict[str, str] | None = None):
        self.models, self.args, self.hybrid_models = models, args, hybrid_models
        self.encoders, self.stores, self.store_encoders = encoders or {}, stores or {}, store_encoders or {}
        self.default_model = next(iter(models), None)
        self.max_new_tokens = {m.name: m.max_new_tokens for m in args.models}
        self.model_types = {m.name: "llm" if m.backend == "text" else "vlm" for m in args.models}  # for /v1/models
        self.limits = args.image_limits
        self.admission = Admission(args.api_key, args.max_request_bytes, args.max_image_bytes, args.body_timeout_s)
        self.conversations = ConversationStore(args.chat_max_conversations, args.chat_max_turns, args.chat_ttl_s,
                                               args.chat_max_image_bytes)
        self.image_fits: dict[str, ImageFit | None] = {}  # by model: asked of its deployment once
        self.encoder_infos: dict[str, EncoderInfo] = {}  # by encoder: asked of its deployment once

    def model(self, name: str | None, allowed: list[str] | None = None) -> tuple[str, DeploymentHandle]:
        """The model a request names (or the default: the first of `allowed`, else of all); 404 otherwise."""
        if allowed is not None and name is not None and name not in allowed:
            raise PixelrayError(f"model {name!r} cannot serve this route; use one of {', '.join(allowed)}", 404,
                                "model_not_found")
        name = name or (allowed[0] if allowed else self.default_model)
        if name is None:
            raise PixelrayError("no vision-language model is served here", 404, "model_not_found")
        if name not in self.models:
            raise PixelrayError(f"model {name!r} is not served here; models: {', '.join(self.models)}", 404,
                                "model_not_found")
        note(model=name)
        return name, self.models[name]

    def encoder(self, name: str) -> tuple[str, DeploymentHandle]:
        """The encoder a /v1/embeddings request names; 404 otherwise."""
        if name not in self.encoders:
            served = f"encoders: {', '.join(self.encoders)}" if self.encoders else "no encoder is served here"
            raise PixelrayError(f"model {name!r} is not an embedding model served here; {served}", 404,
                                "model_not_found")
        note(model=name)
        return name, self.encoders[name]

    def store(self, name: str | None) -> tuple[str, DeploymentHandle]:
        """The store a /search request names (or the only one served); 404 for one not served."""
        if not self.stores:
            raise PixelrayError("no store is searchable here: serve one with search=STORE", 404, "store_not_found")
        if name is None:
            if len(self.stores) > 1:
                raise PixelrayError(f"name the store to search: one of {', '.join(self.stores)}", 400, "store_needed")
            name = next(iter(self.stores))
        if name not in self.stores:
            raise PixelrayError(f"store {name!r} is not searchable here; stores: {', '.join(self.stores)}", 404,
                                "store_not_found")
        return name, self.stores[name]

    async def encoder_info(self, name: str, handle: DeploymentHandle) -> EncoderInfo:
        """The encoder's dimension, text tower, context and image fit."""
        if name not in self.encoder_infos:
            self.encoder_infos[name] = await self.call(handle.info, what="encoder")
        return self.encoder_infos[name]

    def config(self, model: str, max_new_tokens: int, **settings) -> GenerationConfig:
        """A request's decoding settings, within the model's token limit and validated (422 otherwise)."""
        limit = self.max_new_tokens.get(model, 512)
        if max_new_tokens > limit:
            raise PixelrayError(f"max tokens {max_new_tokens} is over this server's limit of {limit} for {model}", 422,
                                "max_tokens_too_large")
        return validated(GenerationConfig, {"max_new_tokens": max_new_tokens, **settings})

    async def image_fit(self, name: str, handle: DeploymentHandle) -> ImageFit | None:
        """How far the model `name` lets an image be scaled down (None: not at all)."""
        if name not in self.image_fits:
            self.image_fits[name] = await handle.image_fit.remote()
        return self.image_fits[name]

    def check_prompt(self, conversation: list[Message]) -> None:
        """A 413 for a conversation whose text is over `max_prompt_chars`, before any model tokenises it
        (the model itself refuses a prompt longer than its context, and cuts the reply to the room left)."""
        chars = sum(len(c) if isinstance(c, str) else sum(len(p.get("text") or "") for p in c)
                    for c in (m["content"] for m in conversation))
        if chars > self.args.max_prompt_chars:
            raise PixelrayError(f"the prompt is {chars:,} characters, over this server's limit of "
                                f"{self.args.max_prompt_chars:,}", 413, "prompt_too_long")

    async def generate(self, handle: DeploymentHandle, conversation: list[Message], images: list,
                       config: GenerationConfig) -> GenerationResult:
        """One reply; a request whose replica died is sent again (up to `retries` times), an overload is a
        503, a PixelrayError from the model (a hybrid's LLM server failing: 502 or 503) keeps its status,
        and a ValueError (an input the model cannot take) is a 400."""
        self.check_prompt(conversation)
        return await self.call(handle.generate, conversation, images, config)

    async def call(self, method: DeploymentHandle, *args, what: str = "model"):
        """`method.remote(*args)` (a deployment's method, e.g. `handle.generate`), as `generate` says; `what`
        names the deployment in the errors (model, encoder, index)."""
        for attempt in range(self.args.retries + 1):
            try:
                return await method.remote(*args)
            except BackPressureError:
                raise PixelrayError(f"the {what} is overloaded: retry shortly", 503, "overloaded") from None
            except RayActorError as e:
                if attempt == self.args.retries:
                    raise PixelrayError(f"the {what} replica failed; retry shortly", 503, "replica_failed") from None
                logger.warning("a %s replica died during a request (%s); sending it again", what, type(e).__name__)
            except PixelrayError as e:  # raised in the replica
                cause = original(e)
                raise PixelrayError(cause.message, cause.status, cause.code) from None
            except ValueError as e:
                raise PixelrayError(f"the {what} refused the input: {public_message(e)}", 400, "model_input") from None
        raise AssertionError("unreachable")


def original(error: Exception) -> Exception:
    """The error a replica raised: Ray's wrapper (RayTaskError) keeps it as its cause."""
    return error.cause if isinstance(error, RayTaskError) and error.cause is not None else error


def public_message(error: Exception) -> str:
    """What an error raised in a replica says, without what Ray wraps around it (the remote traceback: pids,
    actor ids, the server's file paths): the original error's first line."""
    cause = original(error)
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def current(request: Request) -> Server:
    """The routes' dependency: the Server of the ingress replica that received the request."""
    return request.app.state.server
