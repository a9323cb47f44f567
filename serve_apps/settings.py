"""The app's settings, one typed model: the served models (each its own autoscaled deployment) and what
the ingress enforces (key, limits, chat state). `serve run ... key=value` and Serve config files fill it."""

import os
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pixelray.device import DeviceName, DtypeName
from pixelray.generators import resolve_generator
from pixelray.images import MAX_REQUEST_BYTES, UPLOAD_LIMITS, ImageLimits
from pixelray.serve_apps.fetch import AllowedHost, normal_host, parse_allow_list


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelArgs(Strict):
    """One served model: what clients name it, where it loads from, and how it scales."""

    name: str = Field(min_length=1)  # the `model` field of requests
    source: str | None = None  # registry name, hf:ID, hub id or folder (default: `name`)
    device: DeviceName = "auto"
    dtype: DtypeName = "auto"
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
    # where http(s) image URLs may be fetched from (default: nowhere): `host` (ports 80 and 443) or `host:port`;
    # a name that resolves to a loopback or private address is refused, an IP address listed as such is not
    image_url_hosts: list[str] = []
    image_url_timeout_s: float = Field(10.0, gt=0)  # to fetch an image URL whole
    # the names clients call this server by (the Host header; a POST's Origin too), besides localhost,
    # 127.0.0.1, ::1 and the address a request came in on; `*.example.com` for subdomains, `*` for any name
    allowed_hosts: list[str] = []
    max_request_bytes: int = Field(MAX_REQUEST_BYTES, ge=1024)  # chunked bodies too: counted as they arrive
    body_timeout_s: float = Field(60.0, gt=0)  # a request body must have arrived whole within this
    max_image_bytes: int = Field(UPLOAD_LIMITS.max_bytes, ge=1024)
    max_image_pixels: int = Field(UPLOAD_LIMITS.max_pixels, ge=1)
    max_prompt_chars: int = Field(100_000, ge=1)  # the text of a request's conversation, before it is tokenised
    max_images_per_request: int = Field(4, ge=1)  # also the most a /chat conversation collects
    chat_max_turns: int = Field(16, ge=1)
    chat_max_conversations: int = Field(1024, ge=1)
    chat_ttl_s: float = Field(3600.0, gt=0)
    chat_max_image_bytes: int = Field(256 << 20, ge=1)  # all conversations' kept images, decoded, together
    ingress_num_cpus: float = Field(0.1, ge=0)
    # requests the ingress holds at once (it only parses and awaits; the models' limits do the throttling)
    ingress_max_ongoing_requests: int = Field(256, ge=1)
    retries: int = Field(2, ge=0)  # a request whose model replica died is sent again, this many times

    @field_validator("models", mode="before")
    @classmethod
    def _model_names(cls, value):
        """`models=a,b` on the command line: names with default settings."""
        if isinstance(value, str):
            value = [{"name": n.strip()} for n in value.split(",") if n.strip()]
        return [{"name": v} if isinstance(v, str) else v for v in value]

    @field_validator("image_url_hosts", "allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value):
        return [h.strip() for h in value.split(",") if h.strip()] if isinstance(value, str) else value

    @field_validator("image_url_hosts")
    @classmethod
    def _image_url_hosts(cls, value: list[str]) -> list[str]:
        parse_allow_list(value)  # a bad entry fails the app's build, not each request
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*":
                normal_host(name.removeprefix("*."))
        return value

    @cached_property
    def image_url_allow_list(self) -> list[AllowedHost]:
        """`image_url_hosts` parsed (once: each fetched URL is checked against it)."""
        return parse_allow_list(self.image_url_hosts)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    @model_validator(mode="after")
    def _unique(self) -> "AppArgs":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names repeat: {names}")
        return self
