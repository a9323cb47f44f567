"""Searching a feature store: open its index STORE/index (written by `pixelray index`, pipelines/index.py),
embed queries as the store's rows were embedded, and search. Here in the library so that the search command
and the Serve app read it without the batch jobs.

    STORE/index/
      index.faiss          the faiss index over the L2-normalised embeddings, inner product (= cosine)
      index.json           IndexInfo: factory string, tuned search parameters and their recall, dim, count,
                           encoder, the feature files indexed and the row parts (written last: the commit point)
      rows/*.parquet       image_id, path and the kept columns of every vector, in index order (id = row
                           number), so that a search result needs no join with the store
      tuning.npz           the sample queries the search parameters are tuned on, with their exact neighbours

    index = open_index("runs/features")          # ValueError when there is none: run `pixelray index STORE`
    queries = query_vectors(index.manifest, texts=["a red star"])  # the store's own encoder, its text tower
    index.search(queries, k=10)                  # [[Hit(image_id, path, score, columns), ...], ...]
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from pixelray.encoders import Encoder, EncoderSpec, create_encoder, resolve_encoder
from pixelray.images import ImageInput, as_image
from pixelray.storage import split_uri
from pixelray.store import JOB_TABLES, MANIFEST

logger = logging.getLogger(__name__)

FEATURES = JOB_TABLES["embed"]
INDEX_DIR, INDEX_FILE, INFO_FILE, TUNING_FILE = "index", "index.faiss", "index.json", "tuning.npz"


def _import_faiss():
    """Import faiss with two settings its bundled libraries read once, when they load (unless the user set them):

    - OPENBLAS_CORETYPE: faiss-cpu's wheel bundles OpenBLAS 0.3.15, which does not know recent CPUs (Sapphire
      Rapids, Zen 4) and falls back to generic SSE3 kernels: its matrix products (k-means, exact search) run
      5-10x slower (8 instead of 78 GFLOP/s on two Sapphire Rapids cores). The kernels are named from the
      CPU's flags.
    - OMP_WAIT_POLICY=PASSIVE: by default, OpenMP threads spin while they wait; when other processes share
      the cores (Ray workers, a server), the spinning takes their time slices: training a PQ index took 32 s
      instead of 4 on two busy cores. Passive threads sleep instead.
    Both are set only while faiss loads; other libraries (numpy, torch) keep theirs."""
    chosen = {}
    if "OMP_WAIT_POLICY" not in os.environ:
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OPENBLAS_CORETYPE" not in os.environ and platform.system() == "Linux" and platform.machine() == "x86_64":
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next((line for line in f if line.startswith("flags")), "").split())
        except OSError:
            flags = set()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
            chosen["OPENBLAS_CORETYPE"] = "SkylakeX"
        elif {"avx2", "fma"} <= flags:
            chosen["OPENBLAS_CORETYPE"] = "Haswell"
    os.environ.update(chosen)
    try:
        import faiss
    finally:
        for name in chosen:
            del os.environ[name]
    return faiss


faiss = _import_faiss()


class RowPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str  # relative to STORE/index
    rows: int


class IndexInfo(BaseModel):
    """STORE/index/index.json: how the index was made, what it holds, and what the last `build_index` did."""

    model_config = ConfigDict(extra="forbid")
    factory: str  # faiss index_factory string, e.g. "Flat", "IVF4096,Flat", "IVF4096,PQ64"
    metric: Literal["inner_product"] = "inner_product"  # over L2-normalised vectors: cosine similarity
    dim: int
    count: int
    encoder: str | None
    modality: str = "image"
    search_params: str  # faiss ParameterSpace string ("nprobe=24", "efSearch=64"); "" for an exact index
    recall_at_10: float  # of those parameters against exact search, on the tuning queries (their own row left out)
    target_recall: float
    memory_budget: int  # bytes
    index_bytes: int  # size of index.faiss (about its size in memory)
    files: list[str]  # the feature files indexed, relative to STORE/features
    parts: list[RowPart]
    created: str
    updated: str
    updates: int = 0  # incremental updates since it was built
    action: Literal["built", "updated", "unchanged"]  # what the last build_index call did
    added: int  # vectors that call added
    seconds: float  # and how long it took

    def __str__(self) -> str:
        params = f", {self.search_params} (recall@10 {self.recall_at_10:.3f})" if self.search_params else " (exact)"
        return (f"pixelray index: {self.action} {self.factory}{params}: {self.count} vectors of {self.dim} dims, "
                f"{self.added} added in {self.seconds:.1f} s; {self.index_bytes / 2**20:.1f} MiB")


@dataclass
class Hit:
    image_id: str | None
    path: str | None
    score: float  # cosine similarity
    columns: dict[str, Any]  # the row's kept columns (text, text_id, caption, url, ...)


def read_manifest(fs: pafs.FileSystem, root: str, uri: str) -> dict[str, Any]:
    """The store's pixelray.json ({} if it has none but a features/ table); ValueError for a folder that
    is not a store."""
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        if fs.get_file_info(f"{root}/{FEATURES}").type == pafs.FileType.Directory:
            return {}
        raise ValueError(f"{uri} is not a pixelray store (it has no {MANIFEST} and no features/): make one with "
                         "`pixelray embed`") from None
    except ValueError as e:
        raise ValueError(f"{uri}/{MANIFEST} cannot be read ({e})") from None


def feature_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """The names of the store's complete feature files (hidden temporaries are not), sorted."""
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{FEATURES}", allow_not_found=True))
    return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File
                  and i.path.endswith(".parquet") and not os.path.basename(i.path).startswith((".", "_")))


def read_faiss_index(fs: pafs.FileSystem, path: str):
    """A faiss index file, from any pyarrow filesystem."""
    if isinstance(fs, pafs.LocalFileSystem):
        return faiss.read_index(path)
    with fs.open_input_stream(path) as f:
        return faiss.read_index(faiss.PyCallbackIOReader(f.read))


class StoreIndex:
    """An opened index: `search` returns the nearest rows of the store, with their kept columns."""

    def __init__(self, uri: str, info: IndexInfo, index, rows: pa.Table, manifest: dict[str, Any]):
        self.uri, self.info, self.index, self.rows, self.manifest = uri, info, index, rows, manifest
        if info.search_params:
            faiss.ParameterSpace().set_index_parameters(index, info.search_params)

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def count(self) -> int:
        return self.info.count

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The k nearest rows of each query ([n, dim], or one [dim] vector), best first; queries are
        L2-normalised, so scores are cosine similarities."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, not {k!r}")
        q = np.array(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.size == 0:
            raise ValueError(f"empty query (shape {tuple(np.shape(queries))}): give vectors of shape [n, {self.dim}]")
        if q.shape[1] != self.dim:
            raise ValueError(f"query has {q.shape[1]} dims, the index {self.dim}")
        if not np.isfinite(q).all():
            raise ValueError("query holds NaN or infinite values")
        q = np.ascontiguousarray(q)
        faiss.normalize_L2(q)
        scores, ids = self.index.search(q, min(int(k), self.count))
        valid = ids >= 0
        rows = self.rows.take(pa.array(ids[valid])).to_pylist()
        out, at = [], 0
        for d_row, ok in zip(scores, valid):
            hits = []
            for score in d_row[ok]:
                row = rows[at]
                at += 1
                image, path = row.pop("image_id", None), row.pop("path", None)
                hits.append(Hit(image_id=image, path=path, score=float(score), columns=row))
            out.append(hits)
        return out


def _one_chunk(rows: pa.Table) -> pa.Table:
    """The row table in one chunk per column: `take` from a table of many chunks costs milliseconds per
    query (4 ms p50 at 1M rows), from one chunk microseconds. Strings become large_string, whose offsets do
    not overflow at 2 GiB."""
    large = pa.schema([f.with_type(pa.large_string()) if f.type == pa.string() else f for f in rows.schema])
    return rows.cast(large).combine_chunks()


def open_index(store_uri: str, threads: int | None = None) -> StoreIndex:
    """The index of a store, read into memory. ValueError when the store has none (run `pixelray index STORE`)
    or it is incomplete. `threads` sets faiss's OpenMP threads for this process (one query at a time is
    fastest on one thread when other work shares the cores)."""
    uri = store_uri.rstrip("/")
    fs, root, _ = split_uri(uri)
    manifest = read_manifest(fs, root, uri)
    try:
        with fs.open_input_stream(f"{root}/{INDEX_DIR}/{INFO_FILE}") as f:
            info = IndexInfo.model_validate_json(f.read())
    except FileNotFoundError:
        raise ValueError(f"{uri} has no index: run `pixelray index {uri}` first") from None
    except ValueError as e:
        raise ValueError(f"{uri}/{INDEX_DIR}/{INFO_FILE} cannot be read ({e}): run `pixelray index {uri}`") from None
    if threads:
        faiss.omp_set_num_threads(threads)
    index = read_faiss_index(fs, f"{root}/{INDEX_DIR}/{INDEX_FILE}")
    parts = [pq.read_table(f"{root}/{INDEX_DIR}/{p.file}", filesystem=fs) for p in info.parts]
    rows = _one_chunk(pa.concat_tables(parts, promote_options="default")) if parts else None
    if index.ntotal != info.count or rows is None or rows.num_rows != info.count:
        raise ValueError(f"the index of {uri} is incomplete (a build was interrupted): run `pixelray index {uri}` "
                         "again")
    new = len(set(feature_files(fs, root)) - set(info.files))
    if new:
        logger.warning("note: %s has %d feature files not in its index yet: run `pixelray index %s` to add them",
                       uri, new, uri)
    return StoreIndex(uri, info, index, rows, manifest)


__all__ = ["Hit", "IndexInfo", "RowPart", "StoreIndex", "faiss", "feature_files", "open_index", "query_vectors",
           "read_faiss_index", "read_manifest", "store_encoder", "store_encoder_spec"]


def store_encoder_spec(manifest: dict[str, Any]) -> tuple[str, EncoderSpec]:
    """The encoder that embedded a store, as (what it is loaded by, its spec): by its registry name where it
    has one (the folder it was loaded from may be another machine's), else by the source the store records."""
    if manifest.get("job") != "embed" or not manifest.get("encoder"):
        raise ValueError("the store was not written by `pixelray embed`: it records no encoder")
    try:
        return manifest["encoder"], resolve_encoder(manifest["encoder"])
    except ValueError:
        if not manifest.get("encoder_source"):
            raise
        return manifest["encoder_source"], resolve_encoder(manifest["encoder_source"])


def store_encoder(manifest: dict[str, Any], device: str = "auto", text: bool = False) -> Encoder:
    """The store's encoder, loaded (with its text tower when `text`)."""
    return create_encoder(store_encoder_spec(manifest)[1], device=device, text=text, normalize=True)


def query_vectors(manifest: dict[str, Any], texts: list[str] | None = None, images: list[ImageInput] | None = None,
                  device: str = "auto", encoder: Encoder | None = None) -> np.ndarray:
    """Texts or images -> float32 [n, dim] queries, L2-normalised, in the store's space."""
    if bool(texts) == bool(images):
        raise ValueError("give a text query or an image query (one of them)")
    if texts is not None and not all(t and t.strip() for t in texts):
        raise ValueError("the text query is empty")
    encoder = encoder or store_encoder(manifest, device, text=bool(texts))
    out = encoder.encode_text(texts, normalize=True) if texts else encoder.encode(
        encoder.preprocess([as_image(i) for i in images]), normalize=True).embedding
    return out.float().cpu().numpy()

