"""Batch captioning and VQA: images -> Ray Data generator actors -> Parquet captions.

Run as:
    pixelray caption INPUT --out DIR [--model NAME] [--prompt TEXT] [--question TEXT | --questions FILE]
                     [--max-tokens N] [--batch-size N] [--resume]

Same reading, validation, error table and resume rules as `pixelray embed` (embed.py):
CPU tasks read and decode, generator actors (one per GPU, or fractional-CPU actors; for a model
behind servers, `remote:`, a few light actors with many requests in flight each) generate in
batches, and DIR/captions/*.parquet gets one row per image (per image and question with
--questions), DIR/errors/*.parquet one per bad item.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image

from pixelray.generators import (GenerationConfig, GeneratorSpec, check_loadable, create_generator,
                                 resolve_generator, user_turn, with_setting)
from pixelray.errors import TRANSIENT, PixelrayError
from pixelray.generators.remote import RemoteOptions
from pixelray.hybrid.client import API_KEY_ENV
from pixelray.images import ImageFit, ImageLimits
from pixelray.pipelines.config import CaptionConfig
from pixelray.pipelines.decode import decode_rows, error_columns
from pixelray.pipelines.job import JobSummary, Pass, open_store, start, write
from pixelray.pipelines.sources import read_images, resolve_input, resolve_questions
from pixelray.storage import excluded_ids


def decode_for_generation(batch: dict[str, np.ndarray], limits: ImageLimits, max_side: int,
                          prompt: str) -> dict[str, np.ndarray]:
    """Bytes -> RGB arrays (at most max_side on the long side, as soon as each is decoded); the prompt
    each row is asked."""
    decoded = decode_rows(batch, limits, ImageFit(long_side=max_side))
    n = len(batch["data"])
    images = np.empty(n, dtype=object)
    for i in range(n):
        img = decoded.images.get(i)
        images[i] = np.asarray(img) if img is not None else np.zeros((1, 1, 3), np.uint8)
    prompts = batch["question"] if "question" in batch else np.array([prompt] * n, dtype=object)
    return decoded.columns(batch, image=images, prompt=prompts)


class CaptionActor:
    """Loads the generator once; captions (or answers) each batch in one batched generate call."""

    def __init__(self, spec_json: str, device: str, dtype: str, quantization: str | None, generation_json: str,
                 torch_threads: int):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec = GeneratorSpec.model_validate_json(spec_json)
        self.generator = create_generator(self.spec, device=device, dtype=dtype, quantization=quantization)
        self.config = GenerationConfig.model_validate_json(generation_json)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["path"])
        ok = np.flatnonzero(batch["error"] == "")
        texts: list[str | None] = [None] * n
        tokens, finish = np.zeros(n, np.int32), [None] * n
        batch = {**batch, "error_type": batch["error_type"].astype(object), "error": batch["error"].astype(object)}
        if len(ok):
            images = [[Image.fromarray(np.asarray(batch["image"][i], dtype=np.uint8))] for i in ok]
            outcomes = self.generator.chat_items([[user_turn(str(batch["prompt"][i]))] for i in ok], images,
                                                 self.config)
            for i, r in zip(ok, outcomes):
                if isinstance(r, Exception):  # this item failed (an LLM server down, an input refused): an error row
                    kind = TRANSIENT if getattr(r, "transient", False) else "generation"  # --resume retries TRANSIENT
                    batch["error_type"][i], batch["error"][i] = kind, f"{type(r).__name__}: {r}"
                else:
                    texts[i], tokens[i], finish[i] = r.text, r.num_tokens, r.finish_reason
        vqa = "question" in batch
        cfg = self.config
        columns = {
            **({"item_id": pa.array(batch["item_id"], pa.string())} if vqa else {}),
            "image_id": pa.array(batch["image_id"], pa.string()),
            "path": pa.array(batch["path"], pa.string()),
            "model": pa.array([self.spec.identity] * n, pa.string()),
            ("question" if vqa else "prompt"): pa.array(batch["prompt"], pa.string()),
            ("answer" if vqa else "caption"): pa.array(texts, pa.string()),
            "num_tokens": pa.array(tokens, pa.int32()),
            "finish_reason": pa.array(finish, pa.string()),
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
            "max_new_tokens": pa.array([cfg.max_new_tokens] * n, pa.int32()),
            "temperature": pa.array([cfg.temperature] * n, pa.float32()),
            "top_p": pa.array([cfg.top_p] * n, pa.float32()),
            "seed": pa.array([cfg.seed] * n, pa.int64()),
            **error_columns(batch),
        }
        return pa.table(columns)


def server_key_env(spec: GeneratorSpec) -> dict:
    """For a model behind servers (hybrid, remote), the driver's PIXELRAY_LLM_API_KEY for its actors, which may
    run on other nodes (a runtime_env option of the actors; empty when the key is not set)."""
    key = os.environ.get(API_KEY_ENV)
    if spec.backend not in ("hybrid", "remote") or not key:
        return {}
    return {"runtime_env": {"env_vars": {API_KEY_ENV: key}}}


def run_caption(cfg: CaptionConfig) -> JobSummary:
    spec = resolve_generator(cfg.model)
    if cfg.tensor_parallel_size > 1:
        if spec.backend != "vllm":
            raise PixelrayError("--tensor-parallel-size is for the vllm engine: use --model vllm:HUB_ID_OR_DIR or a "
                                "*-vllm registry name")
        spec = spec.model_copy(update={"source": with_setting(spec.source, "tensor_parallel_size",
                                                              cfg.tensor_parallel_size)})
    check_loadable(spec)  # a missing model fails before any image is read
    remote = spec.backend == "remote"
    max_side = min(cfg.max_side, RemoteOptions.from_source(spec.source).max_side) if remote else cfg.max_side
    exclude = excluded_ids(cfg.exclude) if cfg.exclude else frozenset()
    if cfg.questions:
        source = resolve_questions(cfg.questions)
    else:
        source = resolve_input(cfg.input)
    if cfg.question:
        source.questions = [cfg.question] * len(source)
    vqa = source.questions is not None
    if vqa and source.kind != "files":
        raise ValueError("questions need image files (a folder, glob, list or questions file), not shards")
    store, done = open_store(cfg.out, "captions", cfg.manifest(spec), resume=cfg.resume, overwrite=cfg.overwrite,
                             key="item_id" if vqa else "image_id")
    with store:  # the store stays locked until the job ends, however it ends
        batch_size = cfg.model_batch_size(spec)
        rows_per_block = 4 * batch_size
        plan = start(source, cfg.out, address=cfg.address, num_actors=cfg.num_generators, device=cfg.device,
                     rows_per_block=rows_per_block, mlx=spec.backend == "mlx",
                     gpus_per_actor=cfg.tensor_parallel_size, whole_node=spec.backend == "vllm", network=remote)

        def pipeline(run: Pass) -> ray.data.Dataset:
            ds = read_images(source, run.done, rows_per_block=run.size(rows_per_block), max_bytes=cfg.max_image_bytes,
                             task_args=run.task_args())
            ds = ds.map_batches(decode_for_generation, batch_size=run.size(batch_size), batch_format="numpy",
                                fn_kwargs={"limits": cfg.limits, "max_side": max_side, "prompt": cfg.prompt},
                                num_cpus=cfg.decode_cpus, **run.task_args())
            return ds.map_batches(
                CaptionActor, batch_size=run.size(batch_size), batch_format="numpy",
                fn_constructor_kwargs={"spec_json": spec.model_dump_json(), "device": cfg.device, "dtype": cfg.dtype,
                                       "quantization": cfg.quantization,
                                       "generation_json": cfg.generation.model_dump_json(),
                                       "torch_threads": plan.torch_threads},
                **run.actor_args(plan.size, concurrent_calls=2 if remote else 1), **plan.remote_args(),
                **server_key_env(spec),
            )

        summary = write(pipeline, source, store, done, rows_per_file=cfg.rows_per_file,
                        max_task_retries=cfg.max_task_retries, max_crashed_blocks=cfg.max_crashed_blocks,
                        job="caption", verb="answers" if vqa else "images captioned",
                        unit="items" if vqa else "images", exclude=exclude)
    if (table := store.dataset(store.table)) is not None:  # a few of the captions, by file name
        said = "answer" if vqa else "caption"
        rows = table.head(summary.SAMPLES, columns=["path", said, *(["question"] if vqa else [])]).to_pylist()
        summary.samples = [(r["path"].rsplit("/", 1)[-1] + (f" ({r['question']})" if vqa else ""), r[said])
                           for r in rows]
    return summary

