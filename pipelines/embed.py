"""Batch feature extraction: images -> Ray Data encoder actors -> Parquet feature store.

Run as:
    pixelray embed INPUT --out DIR [--encoder NAME] [--batch-size N] [--patches] [--resume]
    python -m pipelines.embed INPUT --out DIR ...

The job reads image bytes (pipelines.sources), decodes, validates and
preprocesses them in CPU tasks, runs the encoder in an actor pool (one actor per
GPU when there are GPUs, fractional-CPU actors otherwise) and writes
DIR/features/*.parquet plus DIR/errors/*.parquet (pipelines.store).
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from pipelines.runtime import cluster_resources, init_ray, plan_pool
from pipelines.sources import read_images, resolve_input
from pipelines.store import Store
from pixelray.encoders import EncoderSpec, create_encoder, resolve_encoder
from pixelray.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, ImageLimits, decode_image


class EmbedConfig(BaseModel):
    """Settings of one `pixelray embed` run."""

    model_config = ConfigDict(extra="forbid")

    input: str
    out: str
    encoder: str = "default"
    batch_size: int = Field(32, ge=1)
    patches: bool = False
    normalize: bool = False
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "fp32"
    num_encoders: int | None = Field(None, ge=1)
    rows_per_file: int = Field(1000, ge=1)
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1)
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    decode_cpus: float = Field(1.0, gt=0)  # differs from the actors' request, so Ray keeps the stages apart
    address: str | None = None

    def manifest(self, spec: EncoderSpec) -> dict:
        """What must not change between a run and its resume."""
        return {"job": "embed", "encoder": spec.name, "encoder_source": spec.source,
                "pretrained": spec.pretrained, "patches": self.patches, "normalize": self.normalize,
                "dtype": self.dtype}


# --- stage 1: decode, validate, preprocess (CPU tasks) -----------------------------------------


@functools.lru_cache(maxsize=4)
def _preprocessor(spec_json: str):
    """Per worker process: the encoder's preprocessing and the shape it produces."""
    preprocess = EncoderSpec.model_validate_json(spec_json).preprocessor()
    shape = preprocess([Image.new("RGB", (64, 64))]).shape[1:]
    return preprocess, shape


def decode_batch(batch: dict[str, np.ndarray], spec_json: str, limits: ImageLimits) -> dict[str, np.ndarray]:
    """Bytes -> pixel tensors; a bad image becomes a row with error_type/error set and zero pixels."""
    preprocess, shape = _preprocessor(spec_json)
    n = len(batch["path"])
    widths, heights = np.zeros(n, np.int32), np.zeros(n, np.int32)
    error_type, error = list(batch["error_type"]), list(batch["error"])
    images: dict[int, Image.Image] = {}
    for i, data in enumerate(batch["data"]):
        if error[i]:
            continue
        try:
            img = decode_image(data, limits)
        except ImageError as e:
            error_type[i], error[i] = e.kind, str(e)
            continue
        widths[i], heights[i] = img.size
        images[i] = img
    pixels = np.zeros((n, *shape), np.float32)
    if images:
        try:
            pixels[list(images)] = preprocess(list(images.values()))
        except Exception:  # isolate the image that breaks the preprocessing
            for i, img in images.items():
                try:
                    pixels[i] = preprocess([img])[0]
                except Exception as e:
                    error_type[i], error[i] = "preprocess_failed", f"preprocessing failed: {e}"
    return {"image_id": batch["image_id"], "path": batch["path"], "width": widths, "height": heights,
            "pixel_values": pixels, "error_type": np.array(error_type, dtype=str),
            "error": np.array(error, dtype=str)}


# --- stage 2: the encoder (actor pool) ---------------------------------------------------------


def _fixed_size_list(arr: np.ndarray) -> pa.Array:
    """[n, d] or [n, p, d] float32 array -> Arrow fixed-size list (of fixed-size lists)."""
    values: pa.Array = pa.array(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1))
    for size in reversed(arr.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


class EmbedActor:
    """Loads the encoder once; embeds each batch of preprocessed images."""

    def __init__(self, spec_json: str, device: str, dtype: str, normalize: bool, patches: bool,
                 torch_threads: int):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        spec = EncoderSpec.model_validate_json(spec_json)
        self.encoder = create_encoder(spec, device=device, dtype=dtype, normalize=normalize)
        self.name, self.patches = spec.name, patches
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
            "embedding": _fixed_size_list(embedding),
        }
        if patches is not None:
            columns["patch_features"] = _fixed_size_list(patches)
        columns["error_type"] = pa.array(np.where(ok, None, batch["error_type"]), pa.string())
        columns["error"] = pa.array(np.where(ok, None, batch["error"]), pa.string())
        return pa.table(columns)


# --- the job -----------------------------------------------------------------------------------


@dataclass
class EmbedSummary:
    written: int
    errors: int
    previously_stored: int
    seconds: float
    store: Store

    @property
    def images_per_s(self) -> float:
        return (self.written + self.errors) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        rows, files = self.store.count("features")
        err_rows, err_files = self.store.count("errors")
        return "\n".join([
            f"pixelray embed: {self.written} images embedded, {self.errors} errors"
            + (f", {self.previously_stored} already in the store (skipped)" if self.previously_stored else "")
            + f" in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)",
            f"  features: {self.store.uri}/features  ({rows} rows in {files} files)",
            f"  errors:   {self.store.uri}/errors  ({err_rows} rows in {err_files} files)",
        ])


def run_embed(cfg: EmbedConfig) -> EmbedSummary:
    spec = resolve_encoder(cfg.encoder)  # a bad name or missing model fails before any image is read
    source = resolve_input(cfg.input)
    store = Store(cfg.out, "features")
    store.prepare(cfg.manifest(spec), resume=cfg.resume, overwrite=cfg.overwrite)
    done = store.stored_ids()
    if source.skipped_files:
        print(f"note: ignored {source.skipped_files} non-image files under {cfg.input}", file=sys.stderr)

    init_ray(cfg.address)
    resources, nodes = cluster_resources()
    if nodes > 1 and "://" not in cfg.out:
        print(f"note: {nodes} nodes write to {cfg.out}; it must be shared storage (NFS) on every node, "
              "or use a URI such as s3://bucket/path", file=sys.stderr)
    rows_per_block = 4 * cfg.batch_size
    blocks = len(source) if source.kind != "files" else -(-len(source) // rows_per_block)
    plan = plan_pool(cfg.num_encoders, cfg.device, resources, nodes, max_useful=blocks)
    spec_json = spec.model_dump_json()
    limits = ImageLimits(max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels)

    ds = read_images(source, done, rows_per_block=rows_per_block)
    ds = ds.map_batches(decode_batch, fn_kwargs={"spec_json": spec_json, "limits": limits},
                        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.decode_cpus)
    ds = ds.map_batches(
        EmbedActor, batch_size=cfg.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"spec_json": spec_json, "device": cfg.device, "dtype": cfg.dtype,
                               "normalize": cfg.normalize, "patches": cfg.patches,
                               "torch_threads": plan.torch_threads},
        compute=ray.data.ActorPoolStrategy(size=plan.size), **plan.remote_args(),
    )
    sink = store.sink(cfg.rows_per_file)
    start = time.perf_counter()
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.1})
    return EmbedSummary(written=sink.stats.rows, errors=sink.stats.errors, previously_stored=len(done),
                        seconds=time.perf_counter() - start, store=store)


if __name__ == "__main__":
    from pixelray.cli import main

    sys.exit(main(["embed", *sys.argv[1:]]))
