"""The vision-language Serve app: caption, VQA, chat and OpenAI-compatible endpoints over one or
more models, each its own autoscaled deployment behind one HTTP ingress.

Run as:
    serve run serve_apps.vlm:build_app                          # the bundled shapes-demo model
    serve run serve_apps.vlm:build_app models=shapes-demo,smolvlm-256m api_key=SECRET
    serve run serve_apps/configs/local.yaml                     # or `serve deploy` it to a cluster
    pixelray serve [--config FILE] [--address ADDR] [key=value ...]

`key=value` arguments set the fields of `AppArgs`; `models` takes comma-separated registry names,
model folders or hub ids (or, in a config file, a list of `ModelArgs`). The HTTP proxy listens on
127.0.0.1:8000 unless the Serve config's http_options say otherwise. A hybrid model (source
`hybrid:ENCODER?url=...`, see pixelray.hybrid) answers on /hybrid and in /v1 like the others:

    serve run serve_apps.vlm:build_app models=hybrid          # CLIP + LM Studio at localhost:1234
"""

import os
import re
from functools import cached_property
from typing import Literal

import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve import Application

from pipelines.runtime import MLX_RESOURCE, NOT_MLX, mlx_units
from pixelray.generators import resolve_generator
from serve_apps.ingress import Ingress, IngressSettings
from serve_apps.model import VLMModel


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelArgs(Strict):
    """One served model: what clients name it, where it loads from, and how it scales."""

    name: str = Field(min_length=1)  # the `model` field of requests
    source: str | None = None  # registry name, hf:ID, hub id or folder (default: `name`)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)  # 1 (or a fraction) on GPU nodes
    mlx_units: float = Field(1.0, gt=0)  # an MLX model's replica: its share of an MLX node's `mlx` resource
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)  # per replica: above it, autoscaling adds replicas
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)  # per replica: more wait in the router's queue
    max_queued_requests: int = Field(512, ge=-1)  # past this the app answers 503 (-1: no limit)
    max_batch_size: int = Field(8, ge=1)  # 1 turns dynamic batching off
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_new_tokens: int = Field(512, ge=1)  # the most one request may ask for

    @cached_property
    def backend(self) -> str:
        """hf, pixelray, text, hybrid or mlx (resolved once: a model folder's config is read)."""
        return resolve_generator(self.source or self.name).backend

    @model_validator(mode="after")
    def _replicas(self) -> "ModelArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"model {self.name}: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class AppArgs(Strict):
    models: list[ModelArgs] = Field(default_factory=lambda: [ModelArgs(name="shapes-demo")], min_length=1)
    api_key: str | None = Field(default_factory=lambda: os.environ.get("PIXELRAY_API_KEY") or None)
    image_url_hosts: list[str] = []  # hosts whose http(s) image URLs may be fetched (default: none)
    max_request_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_images_per_request: int = Field(4, ge=1)  # also the most a /chat conversation collects
    chat_max_turns: int = Field(16, ge=1)
    chat_max_conversations: int = Field(1024, ge=1)
    chat_ttl_s: float = Field(3600.0, gt=0)
    ingress_num_cpus: float = Field(0.1, ge=0)
    # requests the ingress holds at once (it only parses and awaits; the models' limits do the throttling)
    ingress_max_ongoing_requests: int = Field(256, ge=1)

    @field_validator("models", mode="before")
    @classmethod
    def _model_names(cls, value):
        """`models=a,b` on the command line: names with default settings."""
        if isinstance(value, str):
            value = [{"name": n.strip()} for n in value.split(",") if n.strip()]
        return [{"name": v} if isinstance(v, str) else v for v in value]

    @field_validator("image_url_hosts", mode="before")
    @classmethod
    def _hosts(cls, value):
        return [h.strip() for h in value.split(",") if h.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique(self) -> "AppArgs":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names repeat: {names}")
        return self


def deployment_name(model: str) -> str:
    """The Serve deployment that serves the model clients call `model`."""
    return "model-" + re.sub(r"[^\w.-]", "-", model)


def model_deployment(m: ModelArgs) -> Application:
    autoscaling = {"min_replicas": m.min_replicas, "max_replicas": m.max_replicas,
                   "initial_replicas": max(m.min_replicas, 1), "target_ongoing_requests": m.target_ongoing_requests,
                   "upscale_delay_s": m.upscale_delay_s, "downscale_delay_s": m.downscale_delay_s}
    # an MLX model's replicas run on the MLX nodes only (the `mlx` resource); the others never do
    placement = {"resources": {MLX_RESOURCE: m.mlx_units}} if m.backend == "mlx" else {"label_selector": NOT_MLX}
    return VLMModel.options(
        name=deployment_name(m.name), autoscaling_config=autoscaling,
        max_ongoing_requests=m.max_ongoing_requests, max_queued_requests=m.max_queued_requests,
        ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus, **placement},
    ).bind(m.source or m.name, device=m.device, dtype=m.dtype, max_batch_size=m.max_batch_size,
           batch_wait_timeout_s=m.batch_wait_timeout_s)


def build_app(args: AppArgs) -> Application:
    if isinstance(args, dict):  # called directly rather than by Serve
        args = AppArgs.model_validate(args)
    settings = IngressSettings(
        api_key=args.api_key, image_url_hosts=args.image_url_hosts, max_request_bytes=args.max_request_bytes,
        max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
        max_images_per_request=args.max_images_per_request,
        max_new_tokens={m.name: m.max_new_tokens for m in args.models}, chat_max_turns=args.chat_max_turns,
        chat_max_conversations=args.chat_max_conversations, chat_ttl_s=args.chat_ttl_s,
        hybrid_models=[m.name for m in args.models if m.backend == "hybrid"])
    mlx = [m.name for m in args.models if m.backend == "mlx"]
    if mlx and ray.is_initialized():  # (serve run connects first) no MLX node: say so, do not wait forever
        mlx_units(ray.cluster_resources(), f"model {mlx[0]}")
    models = {m.name: model_deployment(m) for m in args.models}
    # one ingress replica: /chat keeps its conversations in the ingress's memory
    return Ingress.options(ray_actor_options={"num_cpus": args.ingress_num_cpus},
                           max_ongoing_requests=args.ingress_max_ongoing_requests).bind(models, settings)
