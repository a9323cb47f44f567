"""The vision-language Serve app: caption, VQA, chat and OpenAI-compatible endpoints over one or
more models, embeddings over encoders and search over indexed stores, each its own autoscaled
deployment behind one HTTP ingress.

Run as:
    serve run pixelray.serve_apps.vlm:build_app                 # the bundled shapes-demo model
    serve run pixelray.serve_apps.vlm:build_app models=shapes-demo,smolvlm-256m api_key=SECRET
    serve run pixelray.serve_apps.vlm:build_app search=OUT     # /search and /v1/embeddings over a store
    serve run serve_apps/configs/local.yaml                     # or `serve deploy` it to a cluster
    pixelray serve [--config FILE] [--address ADDR] [key=value ...]

`key=value` arguments set the fields of `AppArgs` (settings.py); `models` takes comma-separated registry names,
model folders or hub ids (or, in a config file, a list of `ModelArgs`); `encoders` encoder names (or
`EncoderArgs`), served on /v1/embeddings; `search` the paths of stores with an index (`pixelray index`),
each searched on /search by the store's own encoder, served with them. Given encoders or stores and no
models, the app serves no vision-language model. The HTTP proxy listens on
127.0.0.1:8000 unless the Serve config's http_options say otherwise. A hybrid model (source
`hybrid:ENCODER?url=...`, see pixelray.hybrid) answers on /hybrid and in /v1 like the others:

    serve run pixelray.serve_apps.vlm:build_app models=hybrid   # CLIP + LM Studio at localhost:1234
"""

import re

import ray
from ray.serve import Application

from pixelray.runtime import MLX_RESOURCE, NOT_MLX, mlx_units
from pixelray.serve_apps.embedder import EmbeddingModel
from pixelray.serve_apps.ingress import Ingress
from pixelray.serve_apps.engine import VLLMModel
from pixelray.serve_apps.model import VLMModel
from pixelray.serve_apps.search import StoreSearch
from pixelray.serve_apps.settings import AppArgs, EncoderArgs, ModelArgs, SearchArgs

__all__ = ["AppArgs", "EncoderArgs", "ModelArgs", "SearchArgs", "build_app", "deployment_name"]


def deployment_name(model: str, kind: str = "model") -> str:
    """The Serve deployment that serves the model (encoder, store) clients call `model`."""
    return f"{kind}-" + re.sub(r"[^\w.-]", "-", model)


def model_deployment(m: ModelArgs) -> Application:
    # an MLX model's replicas run on the MLX nodes only (the `mlx` resource); the others never do
    placement = {"resources": {MLX_RESOURCE: m.mlx_units}} if m.backend == "mlx" else {"label_selector": NOT_MLX}
    options = dict(**m.deployment_options(deployment_name(m.name)),
                   ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus, **placement})
    if m.backend == "vllm":  # vLLM's engine batches continuously itself
        return VLLMModel.options(**options).bind(m.source or m.name, dtype=m.dtype, name=m.name)
    return VLMModel.options(**options).bind(m.source or m.name, device=m.device, dtype=m.dtype,
                                            max_batch_size=m.max_batch_size,
                                            batch_wait_timeout_s=m.batch_wait_timeout_s, name=m.name)


def encoder_deployment(e: EncoderArgs) -> Application:
    return EmbeddingModel.options(
        **e.deployment_options(deployment_name(e.name, "encoder")),
        ray_actor_options={"num_cpus": e.num_cpus, "num_gpus": e.num_gpus, "label_selector": NOT_MLX},
    ).bind(e.source or e.name, device=e.device, dtype=e.dtype, max_batch_size=e.max_batch_size,
           batch_wait_timeout_s=e.batch_wait_timeout_s)


def search_deployment(s: SearchArgs) -> Application:
    return StoreSearch.options(
        **s.deployment_options(deployment_name(s.name, "search")),
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "label_selector": NOT_MLX},
    ).bind(s.path, threads=max(1, round(s.num_cpus)))


def build_app(args: AppArgs) -> Application:
    if isinstance(args, dict):  # called directly rather than by Serve
        args = AppArgs.model_validate(args)
    encoder_args, store_encoders = args.served_encoders()  # reads the stores' manifests: a bad one fails here
    mlx = [m.name for m in args.models if m.backend == "mlx"]
    if mlx and ray.is_initialized():  # (serve run connects first) no MLX node: say so, do not wait forever
        mlx_units(ray.cluster_resources(), f"model {mlx[0]}")
    models = {m.name: model_deployment(m) for m in args.models}
    hybrid = [m.name for m in args.models if m.backend == "hybrid"]
    encoders = {e.name: encoder_deployment(e) for e in encoder_args}
    stores = {s.name: search_deployment(s) for s in args.search}
    # one ingress replica: /chat keeps its conversations in the ingress's memory
    return Ingress.options(ray_actor_options={"num_cpus": args.ingress_num_cpus},
                           max_ongoing_requests=args.ingress_max_ongoing_requests).bind(
        models, args, hybrid, encoders, stores, store_encoders)
