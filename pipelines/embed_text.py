"""Text embeddings: a column of texts -> the encoder's text tower -> a feature store in its images' space.

Run as:
    pixelray embed CAPTION_STORE --text-column caption --encoder shapes-clip --out DIR
    pixelray embed texts.jsonl --text-column text --encoder clip --out DIR [--columns url,...]

INPUT is a `pixelray caption` store (its captions/ or answers), or Parquet / JSON-lines files (a file, a folder
or a glob). The store has the layout of an image feature store (store.py), keyed by `text_id`:

    text_id    the input row's item_id or image_id when it has one (a caption store's), else a hash of
               `FILE#row:N`, so a resumed run skips the texts already embedded
    image_id   the image the text is about, where the row says: its image_id, or the hash of its `path` /
               `image` column resolved as `pixelray embed` names files (so it matches that image's row
               in an image store); else null
    path       that image's path, text, encoder, embedding, and any --columns kept from the input

A row whose text is null or empty is an error row (`empty_text`); nothing is dropped.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray
import torch

from pixelray.encoders import EncoderSpec, create_encoder, resolve_encoder
from pixelray.images import image_id
from pixelray.pipelines.config import EmbedConfig
from pixelray.pipelines.job import JobSummary, Pass, open_store, start, write
from pixelray.pipelines.sources import Source, _isin, list_input
from pixelray.store import MANIFEST, Store, fixed_size_list
from pixelray.storage import split_uri

TEXT_EXTENSIONS = (".parquet", ".jsonl", ".json", ".ndjson")
ID_COLUMNS = ("item_id", "image_id")  # a row's own id, first found
IMAGE_COLUMNS = ("path", "image")  # the image a row is about
ROWS_PER_BATCH = 256


def resolve_texts(uri: str, column: str, keep: list[str]) -> Source:
    """The text files of INPUT (a caption store: its table's files), checked for `column` and the kept columns."""
    fs, path, _ = split_uri(uri)
    if fs.get_file_info(f"{path.rstrip('/')}/{MANIFEST}").type == pafs.FileType.File:  # a store: its rows
        uri = f"{uri.rstrip('/')}/{Store.written(uri)[0].table}"
    fs, files, prefix, _ = list_input(uri)
    files = [f for f in files if f.lower().endswith(TEXT_EXTENSIONS)]
    if not files:
        raise ValueError(f"input {uri!r} holds no Parquet or JSON-lines files of texts")
    schema = _read_table(fs, files[0], limit=1).schema
    missing = [c for c in (column, *keep) if c not in schema.names]
    if missing:
        raise ValueError(f"{prefix}{files[0]} has no column {missing[0]!r} (it has: {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise ValueError(f"column {column!r} of {prefix}{files[0]} holds {kind}, not text")
    return Source("parquet", [prefix + f for f in files], fs)


def _read_table(fs: pafs.FileSystem, path: str, limit: int | None = None) -> pa.Table:
    if path.lower().endswith(".parquet"):
        pf = pq.ParquetFile(fs.open_input_file(path))
        return pf.read_row_group(0) if limit and pf.num_row_groups else pf.read()
    with fs.open_input_stream(path) as f:
        return pajson.read_json(f)


def read_text_shard(batch: dict[str, np.ndarray], filesystem: pafs.FileSystem, column: str, keep: list[str],
                    done_ref) -> Iterator[pa.Table]:
    """Each shard's rows in batches: ids, the image they are about, the text, kept columns and errors;
    rows whose text_id is in `done` are left out."""
    done = ray.get(done_ref) if isinstance(done_ref, ray.ObjectRef) else done_ref
    for shard in batch["path"]:
        local = shard.split("://", 1)[1] if "://" in shard else shard
        table = _read_table(filesystem, local)
        for start_row in range(0, table.num_rows, ROWS_PER_BATCH):
            part = table.slice(start_row, ROWS_PER_BATCH)
            out = _rows(part, shard, start_row, column, keep)
            mask = ~_isin(np.array(out["text_id"], dtype="S32"), done)
            if mask.any():  # (typed: a column of nulls stays a string column)
                yield pa.table({k: pa.array(v, part.schema.field(k).type if k in keep else pa.string())
                                for k, v in out.items()}).filter(pa.array(mask))


def _rows(part: pa.Table, shard: str, first: int, column: str, keep: list[str]) -> dict[str, list]:
    n, names = part.num_rows, part.column_names
    texts = part[column].to_pylist()
    own = next((part[c].to_pylist() for c in ID_COLUMNS if c in names), None)
    paths = next((part[c].to_pylist() for c in IMAGE_COLUMNS if c in names), [None] * n)
    folder = os.path.dirname(shard)
    paths = [p if not p or "://" in p or p.startswith("/") else os.path.normpath(f"{folder}/{p}") for p in paths]
    images = part["image_id"].to_pylist() if "image_id" in names else [p and image_id(p) for p in paths]
    out = {
        "text_id": own or [image_id(f"{shard}#row:{first + i}") for i in range(n)],
        "image_id": images, "path": paths, "text": [t if isinstance(t, str) else None for t in texts],
        **{c: part[c].to_pylist() for c in keep},
    }
    bad = [not isinstance(t, str) or not t.strip() for t in texts]
    out["error_type"] = ["empty_text" if b else "" for b in bad]
    out["error"] = [f"row {first + i} of {shard}: no text in column {column!r}" if b else ""
                    for i, b in enumerate(bad)]
    return out


class TextEmbedActor:
    """Loads the encoder with its text tower once; embeds each batch of texts."""

    def __init__(self, spec_json: str, device: str, dtype: str, normalize: bool, keep: list[str],
                 torch_threads: int):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        spec = EncoderSpec.model_validate_json(spec_json)
        self.encoder = create_encoder(spec, device=device, dtype=dtype, normalize=normalize, text=True)
        self.name, self.keep = spec.name, keep
        self.dim = self.encoder.encode_text(["probe"]).shape[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["text_id"])
        ok = batch["error"] == ""
        embedding = np.zeros((n, self.dim), np.float32)
        if ok.any():
            embedding[ok] = self.encoder.encode_text([str(t) for t in batch["text"][ok]]).float().cpu().numpy()
        failed = ~ok
        return pa.table({
            "text_id": pa.array(batch["text_id"], pa.string()),
            "image_id": pa.array(batch["image_id"], pa.string()),
            "path": pa.array(batch["path"], pa.string()),
            "text": pa.array(batch["text"], pa.string()),
            "encoder": pa.array([self.name] * n, pa.string()),
            "embedding": fixed_size_list(embedding),
            **{c: pa.array(list(batch[c])) for c in self.keep},
            "error_type": pa.array(np.where(failed, batch["error_type"], None), pa.string()),
            "error": pa.array(np.where(failed, batch["error"], None), pa.string()),
        })


def run_embed_text(cfg: EmbedConfig) -> JobSummary:
    spec = resolve_encoder(cfg.encoder)
    if not spec.has_text:
        raise ValueError(f"encoder {spec.name!r} has no text tower: --text-column needs a CLIP (open_clip) encoder "
                         "such as shapes-clip or clip")
    source = resolve_texts(cfg.input, cfg.text_column, cfg.columns)
    store, done = open_store(cfg.out, "features", cfg.manifest(spec), resume=cfg.resume, overwrite=cfg.overwrite,
                             key="text_id")
    with store:
        plan = start(source, cfg.out, address=cfg.address, num_actors=cfg.num_encoders, device=cfg.device,
                     rows_per_block=ROWS_PER_BATCH)

        def pipeline(run: Pass) -> ray.data.Dataset:
            shards = ray.data.from_items([{"path": u} for u in source.uris], override_num_blocks=len(source))
            ds = shards.map_batches(read_text_shard, batch_size=1, batch_format="numpy",
                                    fn_kwargs={"filesystem": source.filesystem, "column": cfg.text_column,
                                               "keep": cfg.columns, "done_ref": ray.put(run.done)},
                                    **run.task_args())
            return ds.map_batches(
                TextEmbedActor, batch_size=run.size(cfg.batch_size), batch_format="numpy",
                fn_constructor_kwargs={"spec_json": spec.model_dump_json(), "device": cfg.device,
                                       "dtype": cfg.dtype, "normalize": cfg.normalize, "keep": cfg.columns,
                                       "torch_threads": plan.torch_threads},
                **run.actor_args(plan.size), **plan.remote_args(),
            )

        return write(pipeline, source, store, done, rows_per_file=cfg.rows_per_file,
                     max_task_retries=cfg.max_task_retries, max_crashed_blocks=cfg.max_crashed_blocks, job="embed",
                     verb="texts embedded", unit="texts")
