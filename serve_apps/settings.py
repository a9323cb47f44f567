"""The app's settings, one typed model: the served models, encoders and searchable stores (each its own
autoscaled deployment) and what the ingress enforces (key, limits, chat state). `serve run ... key=value`
and Serve config files fill it."""

import json
import os
from functools import cached_property
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pixelray.device import DeviceName, DtypeName
from pixelray.encoders import EncoderSpec, resolve_encoder
from pixelray.generators import resolve_generator
from pixelray.images import MAX_REQUEST_BYTES, UPLOAD_LIMITS, ImageLimits
from pixelray.serve_apps.fetch import AllowedHost, normal_host, parse_allow_list
from pixelray.storage import split_uri
from pixelray.vector_index import store_encoder_spec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scaling(Strict):
    """What each replica of a deployment reserves, and how Serve scales them (autoscaling, queue limits)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)  # 1 (or a fraction) on GPU nodes
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)  # per replica: above it, autoscaling adds replicas
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)  # per replica: more wait in the router's queue
    max_queued_requests: int = Field(512, ge=-1)  # past this the app answers 503 (-1: no limit)

    def deployment_options(self, name: str) -> dict:
        """Serve's options for the deployment `name` (without ray_actor_options: each kind places its own)."""
        autoscaling = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                       "initial_replicas": max(self.min_replicas, 1),
                       "target_ongoing_requests": self.target_ongoing_requests,
                       "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}
        return dict(name=name, autoscaling_config=autoscaling, max_ongoing_requests=self.max_ongoing_requests,
                    max_queued_requests=self.max_queued_requests)

    @model_validator(mode="after")
    def _replicas(self):
        if self.min_replicas > self.max_replicas:
            what = f"{type(self).__name__.removesuffix('Args').lower()} {getattr(self, 'name', '')}"
            raise ValueError(f"{what}: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ModelArgs(Scaling):
    """One served model: what clients name it, where it loads from, and how it scales."""

    name: str = Field(min_length=1)  # the `model` field of requests
    source: str | None = None  # registry name, hf:ID, hub id or folder (default: `name`)
    device: DeviceName = "auto"
    dtype: DtypeName = "auto"
    mlx_units: float = Field(1.0, gt=0)  # an MLX model's replica: its share of an MLX node's `mlx` resource
    max_batch_size: int = Field(8, ge=1)  # 1 turns dynamic batching off
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_new_tokens: int = Field(512, ge=1)  # the most one request may ask for

    @cached_property
    def backend(self) -> str:
        """hf, pixelray, text, hybrid or mlx (resolved once: a model folder's config is read)."""
        return resolve_generator(self.source or self.name).backend


class EncoderArgs(Scaling):
    """One served encoder (POST /v1/embeddings, and the queries of /search): its name, source and scaling."""

    name: str = Field(min_length=1)  # the `model` field of /v1/embeddings requests
    source: str | None = None  # encoder registry name, folder or hub id (default: `name`)
    device: DeviceName = "auto"
    dtype: DtypeName = "fp32"  # as `pixelray embed`'s default, so queries match the stored vectors
    max_batch_size: int = Field(32, ge=1)  # inputs (texts, images) encoded together, from any requests
    batch_wait_timeout_s: float = Field(0.01, ge=0)

    @cached_property
    def spec(self) -> EncoderSpec:
        """The encoder resolved (once: a folder's config is read; a bad name fails the app's build)."""
        return resolve_encoder(self.source or self.name)


class SearchArgs(Scaling):
    """One searchable store (POST /search): a `pixelray embed` store with an index (`pixelray index`). Its
    queries are embedded by the store's own encoder (its manifest's `encoder`), served for it when no
    listed encoder is that one."""

    name: str = ""  # the `store` field of requests (default: the folder's name)
    path: str = Field(min_length=1)  # a local folder or a URI (s3://...)
    num_cpus: float = Field(0.5, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _path(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _name(self) -> "SearchArgs":
        if not self.name:
            self.name = PurePosixPath(self.path.split("://", 1)[-1].rstrip("/")).name or "store"
        return self

    @cached_property
    def manifest(self) -> dict:
        """The store's pixelray.json (read once, when the app is built), checked: a `pixelray embed` store
        with an index, so that a bad path fails the app's build rather than each replica's start."""
        from pixelray.serve_apps.search import has_index

        fs, root, _ = split_uri(self.path)
        root = root.rstrip("/")
        try:
            with fs.open_input_stream(f"{root}/pixelray.json") as f:
                manifest = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise ValueError(f"store {self.path}: not a pixelray store (no readable pixelray.json: {e})") from None
        if not manifest.get("encoder"):
            raise ValueError(f"store {self.path}: its manifest names no encoder (not a `pixelray embed` store)")
        if not has_index(self.path):
            raise ValueError(f"store {self.path} has no index: run `pixelray index {self.path}` first")
        return manifest


class AppArgs(Strict):
    # the vision-language models; with encoders or stores given and no models, none
    models: list[ModelArgs] = Field(default_factory=lambda: [ModelArgs(name="shapes-demo")])
    encoders: list[EncoderArgs] = []  # `encoders=shapes-clip,clip` on the command line
    search: list[SearchArgs] = []  # `search=STORE[,STORE]` on the command line
    max_embedding_inputs: int = Field(256, ge=1)  # inputs in one /v1/embeddings request
    max_search_k: int = Field(100, ge=1)  # the most results one /search asks for
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

    @model_validator(mode="before")
    @classmethod
    def _no_default_model(cls, data):
        """An app given encoders or stores and no models serves no vision-language model."""
        if isinstance(data, dict) and "models" not in data and (data.get("encoders") or data.get("search")):
            data = {**data, "models": []}
        return data

    @field_validator("models", "encoders", mode="before")
    @classmethod
    def _model_names(cls, value):
        """`models=a,b` on the command line: names with default settings."""
        if isinstance(value, str):
            value = [{"name": n.strip()} for n in value.split(",") if n.strip()]
        return [{"name": v} if isinstance(v, str) else v for v in value]

    @field_validator("search", mode="before")
    @classmethod
    def _store_paths(cls, value):
        """`search=a,b` on the command line: store paths, each named after its folder."""
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value

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
        if not (self.models or self.encoders or self.search):
            raise ValueError("nothing to serve: give models, encoders or search stores")
        names = [m.name for m in self.models] + [e.name for e in self.encoders]
        if len(set(names)) != len(names):
            raise ValueError(f"model names repeat: {names}")
        stores = [s.name for s in self.search]
        if len(set(stores)) != len(stores):
            raise ValueError(f"store names repeat: {stores} (name them: search=[{{name: a, path: ...}}, ...])")
        return self

    def served_encoders(self) -> tuple[list[EncoderArgs], dict[str, str]]:
        """The encoders to serve: those listed, and each store's own when none of them is it (matched by what
        they load, not by name); and by store, the name of the encoder that embeds its queries. Reads the
        stores' manifests and resolves the encoders: a bad store or encoder fails the app's build."""
        encoders = list(self.encoders)
        for e in encoders:
            _ = e.spec  # a bad name fails here, not in a replica
        by_store = {}
        for store in self.search:
            wanted, spec = store_encoder_spec(store.manifest)
            same = [e for e in encoders if _loads(e.spec) == _loads(spec)]
            if not same:
                name = PurePosixPath(wanted).name if "/" in wanted else wanted
                if name in [m.name for m in self.models] + [e.name for e in encoders]:
                    raise ValueError(f"store {store.name}: its encoder {wanted!r} would be served as {name!r}, a name "
                                     "in use; list it in `encoders` with a name of its own")
                same = [EncoderArgs(name=name, source=wanted)]
                encoders += same
            by_store[store.name] = same[0].name
        return encoders, by_store


def _loads(spec: EncoderSpec) -> tuple:
    """What an encoder loads: two names for the same weights are one encoder."""
    return spec.backend, spec.source, spec.pretrained, json.dumps(spec.random_config, sort_keys=True)
