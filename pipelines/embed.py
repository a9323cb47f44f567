"""Batch feature extraction: images -> Ray Data encoder actors -> Parquet feature store.

Run as:
    pixelray embed INPUT --out DIR [--encoder NAME] [--batch-size N] [--patches] [--resume]

The job reads image bytes (sources.py), decodes, validates and
preprocesses them in CPU tasks, runs the encoder in an actor pool (one actor per
GPU when there are GPUs, fractional-CPU actors otherwise) and writes
DIR/features/*.parquet plus DIR/errors/*.parquet (store.py).
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image

from pixelray.encoders import EncoderSpec, create_encoder, resolve_encoder
from pixelray.images import ImageFit, ImageLimits
from pixelray.pipelines.config import EmbedConfig
from pixelray.pipelines.decode import decode_rows, error_columns
from pixelray.pipelines.job import JobSummary, Pass, open_store, start, write
from pixelray.pipelines.sources import read_images, resolve_input
from pixelray.store import fixed_size_list


# --- stage 1: decode, validate, preprocess (CPU tasks) -----------------------------------------


@functools.lru_cache(maxsize=4)
def _preprocessor(spec_json: str):
    """Per worker process: the encoder's preprocessing and the shape it produces."""
    preprocess = EncoderSpec.model_validate_json(spec_json).preprocessor()
    shape = preprocess([Image.new("RGB", (64, 64))]).shape[1:]
    return preprocess, shape


def decode_batch(batch: dict[str, np.ndarray], spec_json: str, limits: ImageLimits) -> dict[str, np.ndarray]:
    """Bytes -> pixel tensors; a bad image becomes a row with error_type/error set and zero pixels. Each
    image is downscaled as it is decoded, to twice the encoder's input on its short side (ImageFit.encoder_input)."""
    preprocess, shape = _preprocessor(spec_json)
    decoded = decode_rows(batch, limits, ImageFit.encoder_input(max(shape[-2:])))
    pixels = np.zeros((len(batch["data"]), *shape), np.float32)
    if decoded.images:
        try:
            pixels[list(decoded.images)] = preprocess(list(decoded.images.values()))
        except Exception:  # isolate the image that breaks the preprocessing
            for i, img in list(decoded.images.items()):
                try:
                    pixels[i] = preprocess([img])[0]
                except Exception as e:
                    decoded.fail(i, "preprocess_failed", f"preprocessing failed: {e}")
    return decoded.columns(batch, pixel_values=pixels)


# --- stage 2: the encoder (actor pool) ---------------------------------------------------------


class EmbedActor:
    """Loads the encoder once; embeds each batch of preprocessed images."""

    def __init__(self, spec_json: str, device: str, dtype: str, normalize: bool, patches: bool,
                 torch_threads: int, keep: list[str] = ()):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        spec = EncoderSpec.model_validate_json(spec_json)
        self.encoder = create_encoder(spec, device=device, dtype=dtype, normalize=normalize)
        self.name, self.patches, self.keep = spec.name, patches, list(keep)
        probe = self.encoder.encode(self.encoder.preprocess([Image.new("RGB", (64, 64))]))
        self.dim, self.patch_shape = probe.embedding.shape[1], tuple(probe.patches.shape[1:])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["path"])
        ok = batch["error"] == ""
        embedding = np.zeros((n, self.dim), np.float32)
        patches = np.zeros((n, *self.patch_shape), np.float32) if self.patches else None
        if ok.any():
            out = self.encoder.encode(torch.from_numpy(batch["pixel_values"][ok]))
            embedding[ok] = out.embedding.float().cpu().numpy()
            if patches is not None:
                patches[ok] = out.patches.float().cpu().numpy()
        columns = {
            "image_id": pa.array(batch["image_id"], pa.string()),
            "path": pa.array(batch["path"], pa.string()),
            "encoder": pa.array([self.name] * n, pa.string()),
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
            "embedding": fixed_size_list(embedding),
        }
        if patches is not None:
            columns["patch_features"] = fixed_size_list(patches)
        columns.update({c: pa.array(list(batch[c])) for c in self.keep})  # --columns, as the input had them
        return pa.table({**columns, **error_columns(batch)})


# --- the job -----------------------------------------------------------------------------------


def run_embed(cfg: EmbedConfig) -> JobSummary:
    spec = resolve_encoder(cfg.encoder)  # a bad name or missing model fails before any image is read
    source = resolve_input(cfg.input, cfg.columns)
    store, done = open_store(cfg.out, "features", cfg.manifest(spec), resume=cfg.resume, overwrite=cfg.overwrite)
    with store:  # the store stays locked until the job ends, however it ends
        rows_per_block = 4 * cfg.batch_size
        plan = start(source, cfg.out, address=cfg.address, num_actors=cfg.num_encoders, device=cfg.device,
                     rows_per_block=rows_per_block)
        spec_json = spec.model_dump_json()

        def pipeline(run: Pass) -> ray.data.Dataset:
            ds = read_images(source, run.done, rows_per_block=run.size(rows_per_block), max_bytes=cfg.max_image_bytes,
                             task_args=run.task_args())
            ds = ds.map_batches(decode_batch, fn_kwargs={"spec_json": spec_json, "limits": cfg.limits},
                                batch_size=run.size(cfg.batch_size), batch_format="numpy", num_cpus=cfg.decode_cpus,
                                **run.task_args())
            return ds.map_batches(
                EmbedActor, batch_size=run.size(cfg.batch_size), batch_format="numpy",
                fn_constructor_kwargs={"spec_json": spec_json, "device": cfg.device, "dtype": cfg.dtype,
                                       "normalize": cfg.normalize, "patches": cfg.patches,
                                       "torch_threads": plan.torch_threads, "keep": cfg.columns},
                **run.actor_args(plan.size), **plan.remote_args(),
            )

        return write(pipeline, source, store, done, rows_per_file=cfg.rows_per_file,
                     max_task_retries=cfg.max_task_retries, max_crashed_blocks=cfg.max_crashed_blocks, job="embed",
                     verb="images embedded")

