"""The vision-language Serve app: caption, VQA, chat and OpenAI-compatible endpoints over one or
more models, each its own autoscaled deployment behind one HTTP ingress.

Run as:
    serve run pixelray.serve_apps.vlm:build_app                 # the bundled shapes-demo model
    serve run pixelray.serve_apps.vlm:build_app models=shapes-demo,smolvlm-256m api_key=SECRET
    serve run serve_apps/configs/local.yaml                     # or `serve deploy` it to a cluster
    pixelray serve [--config FILE] [--address ADDR] [key=value ...]

`key=value` arguments set the fields of `AppArgs` (settings.py); `models` takes comma-separated registry names,
model folders or hub ids (or, in a config file, a list of `ModelArgs`). The HTTP proxy listens on
127.0.0.1:8000 unless the Serve config's http_options say otherwise. A hybrid model (source
`hybrid:ENCODER?url=...`, see pixelray.hybrid) answers on /hybrid and in /v1 like the others:

    serve run pixelray.serve_apps.vlm:build_app models=hybrid   # CLIP + LM Studio at localhost:1234
"""

import re

import ray
from ray.serve import Application

from pixelray.runtime import MLX_RESOURCE, NOT_MLX, mlx_units
from pixelray.serve_apps.ingress import Ingress
from pixelray.serve_apps.engine import VLLMModel
from pixelray.serve_apps.model import VLMModel
from pixelray.serve_apps.settings import AppArgs, ModelArgs

__all__ = ["AppArgs", "ModelArgs", "build_app", "deployment_name"]


def deployment_name(model: str) -> str:
    """The Serve deployment that serves the model clients call `model`."""
    return "model-" + re.sub(r"[^\w.-]", "-", model)


def model_deployment(m: ModelArgs) -> Application:
    autoscaling = {"min_replicas": m.min_replicas, "max_replicas": m.max_replicas,
                   "initial_replicas": max(m.min_replicas, 1), "target_ongoing_requests": m.target_ongoing_requests,
                   "upscale_delay_s": m.upscale_delay_s, "downscale_delay_s": m.downscale_delay_s}
    # an MLX model's replicas run on the MLX nodes only (the `mlx` resource); the others never do
    placement = {"resources": {MLX_RESOURCE: m.mlx_units}} if m.backend == "mlx" else {"label_selector": NOT_MLX}
    options = dict(name=deployment_name(m.name), autoscaling_config=autoscaling,
                   max_ongoing_requests=m.max_ongoing_requests, max_queued_requests=m.max_queued_requests,
                   ray_actor_options={"num_cpus": m.num_cpus, "num_gpus": m.num_gpus, **placement})
    if m.backend == "vllm":  # vLLM's engine batches continuously itself
        return VLLMModel.options(**options).bind(m.source or m.name, dtype=m.dtype)
    return VLMModel.options(**options).bind(m.source or m.name, device=m.device, dtype=m.dtype,
                                            max_batch_size=m.max_batch_size,
                                            batch_wait_timeout_s=m.batch_wait_timeout_s)


def build_app(args: AppArgs) -> Application:
    if isinstance(args, dict):  # called directly rather than by Serve
        args = AppArgs.model_validate(args)
    mlx = [m.name for m in args.models if m.backend == "mlx"]
    if mlx and ray.is_initialized():  # (serve run connects first) no MLX node: say so, do not wait forever
        mlx_units(ray.cluster_resources(), f"model {mlx[0]}")
    models = {m.name: model_deployment(m) for m in args.models}
    hybrid = [m.name for m in args.models if m.backend == "hybrid"]
    # one ingress replica: /chat keeps its conversations in the ingress's memory
    return Ingress.options(ray_actor_options={"num_cpus": args.ingress_num_cpus},
                           max_ongoing_requests=args.ingress_max_ongoing_requests).bind(models, args, hybrid)
