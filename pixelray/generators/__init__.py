"""Generator registry: vision-language models that turn images + prompts into text.

    gen = create_generator("smolvlm-256m")          # a registry name, hf:ID, a hub id or a directory
    gen = create_generator("hybrid:clip?url=http://localhost:1234/v1")   # encoder + LM Studio (pixelray.hybrid)
    gen = create_generator("mlx:mlx-community/Qwen2-VL-2B-Instruct-4bit")  # mlx-vlm, on the MLX node pool
    gen = create_generator("vllm:Qwen/Qwen2-VL-2B-Instruct?max_images=2")   # vLLM's engine (pixelray.generators.vllm)
    gen = create_generator("remote:qwen2-vl?url=http://gpu1:8000/v1&url=http://gpu2:8000/v1")  # OpenAI-compatible
                                                  # servers, sent the images (pixelray.generators.remote)
    gen.caption(image), gen.answer(image, question), gen.chat(message, image=image, history=history)
    gen.generate(images, "Describe the image.", GenerationConfig(max_new_tokens=32))   # full results
    gen.chat_batch(conversations, images_per_conversation)                          # what backends implement

Registry names are data (`REGISTRY`); weights come through each library's own loading code
(`from_pretrained`), so offline a model that is not cached fails with the command that fetches it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, ConfigDict

from pixelray.generators.base import (DEFAULT_PROMPT, GenerationConfig, GenerationResult, Generator, Message,
                                      user_turn)
from pixelray.images import ImageFit

__all__ = ["DEFAULT_PROMPT", "GenerationConfig", "GenerationResult", "Generator", "ImageFit", "Message", "user_turn",
           "GeneratorSpec", "REGISTRY", "resolve_generator", "create_generator", "check_loadable", "list_generators",
           "with_setting"]

# Models that ship inside the package (trained by train_jobs/, small enough to commit).
BUNDLED = Path(__file__).resolve().parents[1] / "models"

_MODELS = {  # name: (backend, source, description)
    "shapes-demo": ("pixelray", str(BUNDLED / "shapes-demo"),
                    "bundled: captions and answers about the shapes demo images (3.4M params)"),
    "llava-1.5-7b": ("hf", "llava-hf/llava-1.5-7b-hf", "LLaVA 1.5 7B"),
    "llava-v1.6-mistral-7b": ("hf", "llava-hf/llava-v1.6-mistral-7b-hf", "LLaVA-NeXT (1.6) Mistral 7B"),
    "smolvlm": ("hf", "HuggingFaceTB/SmolVLM-Instruct", "SmolVLM 2B instruct"),
    "smolvlm-256m": ("hf", "HuggingFaceTB/SmolVLM-256M-Instruct", "SmolVLM 256M instruct (CPU friendly)"),
    "qwen2-vl-2b": ("hf", "Qwen/Qwen2-VL-2B-Instruct", "Qwen2-VL 2B instruct"),
    "qwen2.5-vl-3b": ("hf", "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL 3B instruct"),
    "paligemma-3b": ("hf", "google/paligemma-3b-mix-224", "PaliGemma 3B mix 224 (prompts like 'caption en')"),
    "qwen2.5-0.5b-instruct": ("text", "Qwen/Qwen2.5-0.5B-Instruct",
                              "text only: Qwen2.5 0.5B instruct (a hybrid's LLM, served by pixelray)"),
    "llava-1.6-mistral-7b-mlx": ("mlx", "mlx-community/llava-v1.6-mistral-7b-4bit",
                                 "MLX (Apple silicon): LLaVA-NeXT Mistral 7B, 4-bit"),
    "qwen2-vl-2b-mlx": ("mlx", "mlx-community/Qwen2-VL-2B-Instruct-4bit",
                        "MLX (Apple silicon): Qwen2-VL 2B instruct, 4-bit"),
    "smolvlm-mlx": ("mlx", "mlx-community/SmolVLM-Instruct-4bit", "MLX (Apple silicon): SmolVLM 2B instruct, 4-bit"),
    "hybrid": ("hybrid", "clip?url=http://localhost:1234/v1",
               "CLIP ViT-B/32 features summarised to text, captioned by LM Studio at localhost:1234"),
}
# The families vLLM serves run on either engine: NAME is transformers', NAME-vllm the same weights in vLLM.
_VLLM_TWINS = ("llava-1.5-7b", "llava-v1.6-mistral-7b", "smolvlm", "smolvlm-256m", "qwen2-vl-2b", "qwen2.5-vl-3b",
               "paligemma-3b")
_MODELS |= {f"{name}-vllm": ("vllm", _MODELS[name][1], f"{_MODELS[name][2]}, in vLLM") for name in _VLLM_TWINS}
REGISTRY: dict[str, dict[str, str]] = {name: dict(backend=backend, source=source, description=description)
                                       for name, (backend, source, description) in _MODELS.items()}


class GeneratorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    backend: Literal["hf", "pixelray", "text", "hybrid", "mlx", "vllm", "remote"]
    source: str
    description: str = ""

    @property
    def identity(self) -> str:
        """What generates, as a store records it (a resumed job must use the same): the name; for a remote
        model, without what only says where and how patiently it is asked (its servers, timeouts), so that
        a job resumes on another fleet."""
        if self.backend != "remote":
            return self.name
        from pixelray.generators.remote import OPERATIONAL

        model, _, query = self.source.partition("?")
        kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in OPERATIONAL]
        return f"remote:{model}" + (f"?{urlencode(kept)}" if kept else "")


def resolve_generator(name: str) -> GeneratorSpec:
    """A registry name, `hf:ID_OR_DIR`, `pixelray:DIR`, `text:ID_OR_DIR` (a text-only LLM), `mlx:ID_OR_DIR`,
    `vllm:ID_OR_DIR[?key=value&...]` (see pixelray.generators.vllm.VLLMOptions),
    `remote:[MODEL]?url=URL[&url=URL...]&...` (see pixelray.generators.remote.RemoteOptions),
    `hybrid[:ENCODER][?key=value&...]` (see pixelray.hybrid.HybridConfig.from_source), a local model
    directory (pixelray, text or hf by its config's model_type) or a hub id -> spec (nothing loaded)."""
    if name in REGISTRY:
        return GeneratorSpec(name=name, **REGISTRY[name])
    if name.startswith(("hybrid:", "hybrid?")):
        return GeneratorSpec(name=name, backend="hybrid", source=name[len("hybrid"):].removeprefix(":"))
    if name.startswith(("hf:", "pixelray:", "text:", "mlx:", "vllm:", "remote:")):
        backend, source = name.split(":", 1)
        return GeneratorSpec(name=name, backend=backend, source=source)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"directory {path} has no config.json: not a transformers model folder")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        return GeneratorSpec(name=name, backend=_folder_backend(model_type), source=str(path.resolve()))
    if name.count("/") == 1 and not name.startswith(("/", ".")):
        return GeneratorSpec(name=name, backend="hf", source=name)
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(REGISTRY)}, hf:HUB_ID, text:HUB_ID, "
                     "mlx:HUB_ID, vllm:HUB_ID, remote:MODEL?url=URL, hybrid:ENCODER?url=URL, a hub id (org/name) or a "
                     "local model directory")


def with_setting(source: str, key: str, value) -> str:
    """A model source with `key=value` set in its query string (`DIR?a=1` -> `DIR?a=1&key=value`)."""
    base, _, query = source.partition("?")
    settings = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != key] + [(key, str(value))]
    return f"{base}?{urlencode(settings)}"


def _folder_backend(model_type: str | None) -> str:
    """pixelray for the project's model, text for a causal LM without vision, hf for the rest."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if model_type == "pixelray":
        return "pixelray"
    text_only = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return "text" if text_only else "hf"


def create_generator(name: str | GeneratorSpec, device: str = "auto", dtype: str = "auto",
                     quantization: str | None = None) -> Generator:
    spec = name if isinstance(name, GeneratorSpec) else resolve_generator(name)
    if quantization and spec.backend not in ("hf", "text"):
        raise ValueError(f"4/8-bit loading is for the hf and text backends, not {spec.backend}"
                         + (" (MLX models come quantized: pick a 4-bit one)" if spec.backend == "mlx" else "")
                         + (" (vLLM loads quantized checkpoints, AWQ or GPTQ, as they are)" if spec.backend == "vllm"
                            else ""))
    if spec.backend == "remote":
        from pixelray.generators.remote import RemoteGenerator

        return RemoteGenerator(spec.source, name=spec.name)
    if spec.backend == "vllm":
        from pixelray.generators.vllm import VLLMGenerator

        return VLLMGenerator(spec.source, device=device, dtype=dtype, name=spec.name)
    if spec.backend == "mlx":
        from pixelray.generators.mlx import MLXGenerator

        return MLXGenerator(spec.source, device=device, name=spec.name)
    if spec.backend == "hybrid":
        from pixelray.generators.hybrid import HybridGenerator

        return HybridGenerator(spec.source, device=device, name=spec.name)
    if spec.backend == "text":
        from pixelray.generators.text import TextGenerator

        return TextGenerator(spec.source, device=device, dtype=dtype, quantization=quantization, name=spec.name)
    if spec.backend == "pixelray":
        from pixelray.generators.pixelray import PixelRayGenerator

        return PixelRayGenerator(spec.source, device=device, dtype=dtype, name=spec.name)
    from pixelray.generators.hf import HFGenerator

    return HFGenerator(spec.source, device=device, dtype=dtype, quantization=quantization, name=spec.name)


def check_loadable(spec: GeneratorSpec) -> None:
    """Fail now, before any image is read, if the model's config cannot be loaded (e.g. offline).
    For a hybrid: its settings and template, and a warning when its LLM server does not answer."""
    if spec.backend == "hybrid":
        return _check_hybrid(spec)
    if spec.backend == "remote":
        return _check_remote(spec)
    if spec.backend == "mlx":  # loaded (and downloaded) on the MLX nodes; a local folder must be a model
        folder = Path(spec.source.partition("?")[0]).expanduser()
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise ValueError(f"{folder} has no config.json: not an mlx-vlm model folder")
        return None
    from transformers import AutoConfig

    import pixelray.vlm  # noqa: F401  (registers model_type "pixelray" with AutoConfig)
    from pixelray.hub import not_available

    source = spec.source
    if spec.backend == "vllm":
        from pixelray.generators.vllm import VLLMOptions

        source, _ = VLLMOptions.from_source(spec.source)  # (its settings are checked here too)
    try:
        AutoConfig.from_pretrained(source)
    except Exception as e:
        raise not_available(source, e) from None


def _check_hybrid(spec: GeneratorSpec) -> None:
    import logging

    from pixelray.encoders import resolve_encoder
    from pixelray.hybrid import HybridConfig, PromptTemplate, check_lm_studio_available

    config = HybridConfig.from_source(spec.source)
    PromptTemplate(config.template)
    if not Path(config.encoder).expanduser().exists():  # a folder or checkpoint is read by the actors
        resolve_encoder(config.encoder)
    if not check_lm_studio_available(config.llm):
        logging.getLogger(__name__).warning(
            "the LLM server at %s does not answer now: items it cannot answer are recorded as errors",
            config.llm.base_url)


def _check_remote(spec: GeneratorSpec) -> None:
    """Its settings; a warning for each server that does not answer now (one quick try each)."""
    import logging

    from pixelray.generators.remote import RemoteOptions
    from pixelray.hybrid import check_lm_studio_available

    options = RemoteOptions.from_source(spec.source)
    for url in options.urls:
        if not check_lm_studio_available(options.client_config(url)):
            logging.getLogger(__name__).warning(
                "the server at %s does not answer now: its requests go to the others, or are recorded as errors "
                "(`--resume` tries them again)", url)


def available_offline(source: str) -> bool:
    """Whether `from_pretrained(source)` can work without network: a folder, or in the HF cache."""
    if Path(source).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(source, "config.json"), str)


def list_generators() -> dict[str, tuple[str, str, str]]:
    """Registry name -> (description, source, where its weights are: offline, download, or server
    for a hybrid, whose encoder is loaded here and whose LLM answers from its own server)."""
    def where(e: dict[str, str]) -> str:
        if e["backend"] in ("hybrid", "remote"):
            return "server"
        return "offline" if available_offline(e["source"]) else "download"
    return {name: (e["description"], e["source"], where(e)) for name, e in REGISTRY.items()}
