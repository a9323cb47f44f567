"""Vector index of a feature store (faiss), built beside the store and updated when a resumed store grows.

Run as:
    pixelray index STORE [--memory-budget 4GiB] [--target-recall 0.95] [--rebuild]

    STORE/index/  index.faiss, index.json (IndexInfo), rows/*.parquet, tuning.npz: see pixelray/vector_index.py,
                  the read side (open_index, StoreIndex.search), which this module re-exports

The kind of index is chosen as autofaiss chooses it, from the row count, the dimension and a memory budget:
an exact `Flat` index below FLAT_MAX rows (exact search is fast enough there); above it an inverted file with
nlist ~ 4*sqrt(n) lists (a power of two) whose codes are the largest that fit the budget: full vectors
(`IVF…,Flat`), 8-bit scalar quantization (`SQ8`) or product quantization (`PQm`). HNSW is not picked (its graph
costs memory on top of the full vectors, so it cannot be sized to a budget, and it builds 2x slower than an
inverted file at 100k vectors) but `factory="HNSW32"` asks for it; benchmarks/search.py compares the kinds.
The inverted file is trained on a random sample (at most TRAIN_PER_LIST vectors per list), then vectors are
added file by file: one file's embeddings are in memory at a time, besides the index. The search parameter
(nprobe; efSearch for HNSW) is the smallest whose recall@10 against exact search reaches `target_recall`, with
a margin, on TUNE_QUERIES vectors of the store (each query's own row left out); their exact neighbours are
found in the same pass that adds the vectors.

Update: when the store holds feature files the index has not seen (a resumed `pixelray embed`), only their
vectors are added to the trained index (no retraining), their rows are appended as a new part, and the search
parameter is tuned again: the tuning queries' stored exact neighbours are merged with their neighbours among
the new vectors, so the old vectors are not read again. The kind of index is kept however much the store grows
(a Flat index chosen for 1k rows stays Flat at 10M: exact, but slow to search; an IVF trained on 100k rows
spreads 10M over too few lists): `rebuild=True` starts over and chooses again. An index that no longer matches
its store (indexed files gone, another encoder or dimension, a write that was interrupted) is rebuilt.

The build holds the store's lock (lock.py), so that it never runs while `pixelray embed` writes the store.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pixelray.lock import StoreLock
from pixelray.store import MANIFEST, Store, atomic_output, write_parquet_atomic
from pixelray.vector_index import (FEATURES, INDEX_DIR, INDEX_FILE, INFO_FILE, TUNING_FILE, Hit, IndexInfo, RowPart,
                                   StoreIndex, faiss, feature_files, open_index, read_faiss_index)

logger = logging.getLogger(__name__)

NOT_KEPT = ("embedding", "patch_features", "encoder", "width", "height")  # feature columns not in the row table
FLAT_MAX = 20_000  # below this many rows the index is exact (one query scans 40 MB of 512-d vectors: ~5 ms)
TRAIN_PER_LIST = 40  # training vectors per inverted list (faiss wants >= 39)
KMEANS_ITERATIONS = 10  # of the coarse quantizer (faiss's default 25 costs 2.5x the time for little gain)
MIN_TRAIN, MAX_TRAIN = 65_536, 262_144  # (PQ and SQ codebooks learn from the sample too)
TUNE_QUERIES, TUNE_K = 1000, 10
TUNE_MARGIN = 0.5  # tuned to miss half of what the target recall allows (see _tune)
ROWS_PER_PART = 1_000_000
READ_ROWS = 65_536  # rows read from a feature file at a time
DEFAULT_BUDGET = "4GiB"


def parse_bytes(value: str | int) -> int:
    """4GiB, 500MB, 2G, 1048576 -> bytes (K/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*", str(value).lower())
        if not m:
            raise ValueError(f"memory budget {value!r}: give bytes, or a size such as 4GiB or 500MB")
        n = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** " kmgt".index(m.group(2) or " "))
    if n <= 0:
        raise ValueError(f"memory budget {value!r} must be positive")
    return n


# --- choosing the index ----------------------------------------------------------------------


def ivf_lists(n: int) -> int:
    """nlist: the power of two nearest 4*sqrt(n) (autofaiss's lower end), at most n / 39 (k-means needs 39
    points per centroid)."""
    return max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39))


def index_bytes(factory: str, n: int, dim: int) -> int:
    """About the memory an index of this kind takes for n vectors (codes, ids, centroids)."""
    m = re.fullmatch(r"IVF(\d+)(?:_HNSW\d+)?,(Flat|SQ8|PQ(\d+)(?:x8)?)", factory)
    if factory == "Flat":
        return 4 * dim * n
    if factory.startswith("HNSW"):
        return n * (4 * dim + 8 * int(factory[4:].split(",")[0] or 32))
    if not m:
        raise ValueError(f"cannot size index {factory!r}")
    code = {"Flat": 4 * dim, "SQ8": dim}.get(m.group(2)) or int(m.group(3))
    return n * (code + 8) + int(m.group(1)) * dim * 4


def choose_factory(n: int, dim: int, budget: int) -> str:
    """The index for n vectors of `dim` dims in `budget` bytes (see the module's docstring)."""
    if n < FLAT_MAX and index_bytes("Flat", n, dim) <= budget:
        return "Flat"
    nlist = ivf_lists(n)
    pq = [f"PQ{m}" for m in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32) if m >= 4 and dim % m == 0]
    for codes in ("Flat", "SQ8", *pq):
        if index_bytes(f"IVF{nlist},{codes}", n, dim) <= budget:
            return f"IVF{nlist},{codes}"
    need = index_bytes(f"IVF{nlist},{pq[-1] if pq else 'SQ8'}", n, dim)
    raise ValueError(f"a memory budget of {budget:,} bytes is too small for {n:,} vectors of {dim} dims: the "
                     f"smallest index here needs about {need:,}")


# --- the store's feature files ---------------------------------------------------------------


class StoreFeatures:
    """A store's feature files, checked: what is indexed."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.store = Store(self.uri, FEATURES)
        self.fs, self.root = self.store.fs, self.store.root
        has_manifest = self.fs.get_file_info(f"{self.root}/{MANIFEST}").type == pafs.FileType.File
        has_features = self.fs.get_file_info(self.store.dir(FEATURES)).type == pafs.FileType.Directory
        if not has_manifest and not has_features:
            raise ValueError(f"{self.uri} is not a pixelray store (it has no {MANIFEST} and no features/): "
                             "make one with `pixelray embed`")
        self.manifest = self.store.read_manifest()
        if not has_features:
            job = self.manifest.get("job")
            raise ValueError(f"{self.uri} has no features/ table{f' (it is a {job} store)' if job else ''}: "
                             "index a store made by `pixelray embed`")
        self.files = feature_files(self.fs, self.root)

    def path(self, name: str) -> str:
        return f"{self.store.dir(FEATURES)}/{name}"

    def rows(self, name: str) -> int:
        with self.fs.open_input_file(self.path(name)) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def dim(self, name: str) -> int | None:
        """The embedding size from the file's schema (None for a variable-size list: found when read)."""
        with self.fs.open_input_file(self.path(name)) as f:
            schema = pq.ParquetFile(f).schema_arrow
        if "embedding" not in schema.names:
            raise ValueError(f"{self.uri} has no embedding column (features/{name} has: {', '.join(schema.names)}); "
                             "index a store made by `pixelray embed`")
        kind = schema.field("embedding").type
        return kind.list_size if pa.types.is_fixed_size_list(kind) else None

    def read(self, name: str, with_rows: bool = True) -> Iterator[tuple[np.ndarray, pa.Table | None]]:
        """A file's normalised embeddings [m, dim] (and its row-table rows), READ_ROWS at a time."""
        with self.fs.open_input_file(self.path(name)) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "embedding" not in names:
                raise ValueError(f"{self.uri}/features/{name} has no embedding column")
            kept = [c for c in names if c not in NOT_KEPT] if with_rows else []
            for batch in pf.iter_batches(batch_size=READ_ROWS, columns=["embedding", *kept]):
                table = pa.Table.from_batches([batch])
                rows = table.drop_columns(["embedding"]) if with_rows else None
                if rows is not None:
                    for col in ("path", "image_id"):
                        if col not in rows.column_names:
                            rows = rows.add_column(0, col, pa.nulls(rows.num_rows, pa.string()))
                yield _vectors(table["embedding"], f"{self.uri}/features/{name}"), rows


def _vectors(column: pa.ChunkedArray, where: str) -> np.ndarray:
    """An Arrow list column of embeddings -> a C-contiguous float32 array, L2-normalised rows."""
    arr = column.combine_chunks()
    if arr.null_count:
        raise ValueError(f"{where} has {arr.null_count} rows without an embedding")
    if not len(arr):
        return np.zeros((0, arr.type.list_size if pa.types.is_fixed_size_list(arr.type) else 0), np.float32)
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = pc.unique(pc.list_value_length(arr)).to_pylist()
        if len(lengths) != 1:
            raise ValueError(f"{where}: embeddings of different sizes ({sorted(lengths)[:5]})")
    x = np.array(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(arr), -1)
    faiss.normalize_L2(x)
    return x


# --- files in the index folder ---------------------------------------------------------------


def _info_path(src: StoreFeatures, name: str) -> str:
    return f"{src.root}/{INDEX_DIR}/{name}"


def _read_info(src: StoreFeatures) -> IndexInfo | None:
    try:
        with src.fs.open_input_stream(_info_path(src, INFO_FILE)) as f:
            return IndexInfo.model_validate_json(f.read())
    except FileNotFoundError:
        return None
    except ValueError as e:
        logger.warning("warning: %s cannot be read (%s); the index is built again", _info_path(src, INFO_FILE), e)
        return None


def _write_index(fs: pafs.FileSystem, path: str, index) -> int:
    with atomic_output(fs, path) as f:
        writer = faiss.PyCallbackIOWriter(f.write)
        faiss.write_index(index, writer)
        del writer
    return fs.get_file_info(path).size


@dataclass
class _Tuning:
    """Sample queries (normalised store vectors), their own row ids, and their exact neighbours so far."""

    queries: np.ndarray
    ids: np.ndarray
    D: np.ndarray
    I: np.ndarray  # noqa: E741

    def heap(self):
        heap = faiss.ResultHeap(len(self.queries), self.D.shape[1], keep_max=True)
        heap.add_result(self.D, self.I)
        return heap

    def save(self, fs: pafs.FileSystem, path: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, queries=self.queries, ids=self.ids, D=self.D, I=self.I)
        with atomic_output(fs, path) as f:
            f.write(buf.getvalue())

    @classmethod
    def load(cls, fs: pafs.FileSystem, path: str) -> "_Tuning | None":
        try:
            with fs.open_input_stream(path) as f:
                z = np.load(io.BytesIO(f.read()))
                return cls(z["queries"], z["ids"], z["D"], z["I"])
        except Exception:  # missing or unreadable: the index is built again
            return None


# --- build and update ------------------------------------------------------------------------


def build_index(store_uri: str, memory_budget: str | int = DEFAULT_BUDGET, target_recall: float = 0.95,
                rebuild: bool = False, *, factory: str | None = None, threads: int | None = None) -> IndexInfo:
    """Build STORE/index, or bring it up to date with the store (see the module's docstring).

    `factory` overrides the choice of index (a faiss index_factory string); `threads` the OpenMP threads faiss
    uses (default: faiss's, all the cores it may use). ValueError for a folder that is not a feature store, a
    store without embeddings or rows, or a budget too small."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall {target_recall} must be in (0, 1]")
    budget = parse_bytes(memory_budget)
    src = StoreFeatures(store_uri)
    if not src.files:
        raise ValueError(f"{src.uri} has no rows to index (features/ is empty)")
    dim = src.dim(src.files[0])
    lock = StoreLock(src.fs, src.root, src.uri)
    lock.acquire()
    old_threads = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        t0 = time.time()
        _remove_temporaries(src)
        info = None if rebuild else _read_info(src)
        reason = _stale(info, src, dim, factory) if info else None
        if info and not reason:
            new = [f for f in src.files if f not in set(info.files)]
            if not new:
                return info.model_copy(update={"action": "unchanged", "added": 0, "seconds": time.time() - t0})
            updated = _update(src, info, new, t0)
            if updated is not None:
                return updated
            reason = "the index file does not match index.json (a write was interrupted)"
        if reason:
            logger.warning("note: %s/index is built again: %s", src.uri, reason)
        return _build(src, dim, budget, target_recall, factory, t0)
    finally:
        faiss.omp_set_num_threads(old_threads)
        lock.release()


def _remove_temporaries(src: StoreFeatures) -> None:
    for folder in (f"{src.root}/{INDEX_DIR}", f"{src.root}/{INDEX_DIR}/rows"):
        for i in src.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            name = os.path.basename(i.path)
            if name.startswith(".") and name.endswith(".tmp"):
                src.fs.delete_file(i.path)


def _stale(info: IndexInfo, src: StoreFeatures, dim: int | None, factory: str | None) -> str | None:
    """Why the index no longer fits its store (then it is built again), or None."""
    if factory and factory != info.factory:
        return f"index {factory} asked for, {info.factory} found"
    if dim is not None and dim != info.dim:
        return f"the store's embeddings have {dim} dims, the index {info.dim}"
    if src.manifest.get("encoder") != info.encoder:
        return f"the store's encoder is {src.manifest.get('encoder')!r}, the index's {info.encoder!r}"
    gone = sorted(set(info.files) - set(src.files))
    if gone:
        return f"{len(gone)} indexed feature files are gone from the store (features/{gone[0]}, ...)"
    return None


def _build(src: StoreFeatures, dim: int | None, budget: int, target_recall: float, factory: str | None,
           t0: float) -> IndexInfo:
    counts = [src.rows(f) for f in src.files]
    n = sum(counts)
    if n == 0:
        raise ValueError(f"{src.uri} has no rows to index (its feature files are empty)")
    if dim is None:
        dim = next(x.shape[1] for f, c in zip(src.files, counts) if c for x, _ in src.read(f, with_rows=False))
    factory = factory or choose_factory(n, dim, budget)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    exact = factory == "Flat"
    folder = f"{src.root}/{INDEX_DIR}"
    if src.fs.get_file_info(folder).type != pafs.FileType.NotFound:
        src.fs.delete_dir(folder)
    src.fs.create_dir(f"{folder}/rows", recursive=True)

    tuning = None
    if not exact:
        rng = np.random.default_rng(0)
        n_train = min(n, MAX_TRAIN, max(TRAIN_PER_LIST * _nlist(index), MIN_TRAIN)) if not index.is_trained else 0
        train_ids = np.sort(rng.choice(n, n_train, replace=False))
        tune_ids = np.sort(rng.choice(n, min(n, TUNE_QUERIES), replace=False))
        train, queries = _sample(src, counts, dim, train_ids, tune_ids)
        logger.info("sampled %d training vectors and %d tuning queries in %.1f s", n_train, len(queries),
                    time.time() - t0)
        if n_train:
            if _nlist(index) > 1:
                ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
                ivf.cp.niter = KMEANS_ITERATIONS
                if isinstance(ivf, faiss.IndexIVFPQ):  # (polysemous codes are for Hamming filtering, unused here;
                    ivf.do_polysemous_training = False  # training them took 150 s of a 155 s build)
            logger.info("training %s on %d vectors", factory, n_train)
            index.train(train)
            logger.info("trained in %.1f s", time.time() - t0)
        del train
        k = min(n, TUNE_K + 1)
        tuning = _Tuning(queries, tune_ids, np.full((len(queries), k), -np.inf, np.float32),
                         np.full((len(queries), k), -1, np.int64))
    parts = _add(src, index, src.files, tuning, f"{folder}/rows", generation=0)
    logger.info("added %d vectors in %.1f s", index.ntotal, time.time() - t0)
    params, recall = _tune(index, tuning, target_recall) if tuning is not None else ("", 1.0)
    logger.info("tuned %s (recall@10 %.3f) in %.1f s", params or "nothing (exact)", recall, time.time() - t0)
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    info = IndexInfo(factory=factory, dim=dim, count=index.ntotal, encoder=src.manifest.get("encoder"),
                     modality=src.manifest.get("modality", "image"), search_params=params, recall_at_10=recall,
                     target_recall=target_recall, memory_budget=budget, index_bytes=0, files=list(src.files),
                     parts=parts, created=now, updated=now, action="built", added=index.ntotal, seconds=0.0)
    return _commit(src, index, info, tuning, t0)


def _update(src: StoreFeatures, info: IndexInfo, new: list[str], t0: float) -> IndexInfo | None:
    """Add the new files' vectors to the trained index; None when the stored index does not match its info."""
    index = read_faiss_index(src.fs, _info_path(src, INDEX_FILE))
    tuning = _Tuning.load(src.fs, _info_path(src, TUNING_FILE)) if info.search_params else None
    if index.ntotal != info.count or sum(p.rows for p in info.parts) != info.count or (
            info.search_params and tuning is None):
        return None
    before = index.ntotal
    parts = _add(src, index, new, tuning, f"{src.root}/{INDEX_DIR}/rows", generation=info.updates + 1)
    params, recall = ((_tune(index, tuning, info.target_recall)) if tuning is not None else ("", 1.0))
    info = info.model_copy(update={
        "count": index.ntotal, "files": [*info.files, *new], "parts": [*info.parts, *parts], "search_params": params,
        "recall_at_10": recall, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "updates": info.updates + 1,
        "action": "updated", "added": index.ntotal - before})
    return _commit(src, index, info, tuning, t0)


def _commit(src: StoreFeatures, index, info: IndexInfo, tuning: _Tuning | None, t0: float) -> IndexInfo:
    """index.faiss, tuning.npz, then index.json: the rows parts are already written; until index.json names
    them (and the new count) a reader sees the previous index."""
    size = _write_index(src.fs, _info_path(src, INDEX_FILE), index)
    if tuning is not None:
        tuning.save(src.fs, _info_path(src, TUNING_FILE))
    info = info.model_copy(update={"index_bytes": size, "seconds": round(time.time() - t0, 3)})
    with atomic_output(src.fs, _info_path(src, INFO_FILE)) as f:
        f.write(info.model_dump_json(indent=2).encode())
    return info


def _nlist(index) -> int:
    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return 1


def _sample(src: StoreFeatures, counts: list[int], dim: int, *wanted: np.ndarray) -> list[np.ndarray]:
    """The vectors at the given (sorted) global row numbers, for each array of them: one pass over the files,
    reading only those that hold some."""
    out = [np.empty((len(ids), dim), np.float32) for ids in wanted]
    filled = [0] * len(wanted)
    start = 0
    for name, count in zip(src.files, counts):
        stop = start + count
        if any(np.searchsorted(ids, start) < np.searchsorted(ids, stop) for ids in wanted):
            offset = start
            for x, _ in src.read(name, with_rows=False):
                for j, ids in enumerate(wanted):
                    lo, hi = np.searchsorted(ids, offset), np.searchsorted(ids, offset + len(x))
                    out[j][filled[j]:filled[j] + hi - lo] = x[ids[lo:hi] - offset]
                    filled[j] += hi - lo
                offset += len(x)
        start = stop
    return out


def _add(src: StoreFeatures, index, files: list[str], tuning: _Tuning | None, rows_dir: str,
         generation: int) -> list[RowPart]:
    """Add the files' vectors to the index, file by file, writing their rows as parts of at most ROWS_PER_PART
    rows; the tuning queries' exact neighbours among them are merged in as they pass."""
    heap = tuning.heap() if tuning is not None else None
    parts: list[RowPart] = []
    pending: list[pa.Table] = []

    def flush() -> None:
        if pending:
            table = pa.concat_tables(pending, promote_options="default")
            name = f"rows/{generation:05d}-{len(parts):04d}-{uuid.uuid4().hex[:6]}.parquet"
            write_parquet_atomic(table, src.fs, f"{rows_dir}/{os.path.basename(name)}")
            parts.append(RowPart(file=name, rows=table.num_rows))
            pending.clear()

    for name in files:
        for x, rows in src.read(name):
            if not len(x):
                continue
            if x.shape[1] != index.d:
                raise ValueError(f"{src.uri}/features/{name} has embeddings of {x.shape[1]} dims, the index {index.d}")
            if heap is not None:
                scores, ids = faiss.knn(tuning.queries, x, min(len(x), tuning.D.shape[1]),
                                        metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(scores, ids + index.ntotal)
            index.add(x)
            pending.append(rows)
            if sum(t.num_rows for t in pending) >= ROWS_PER_PART:
                flush()
    flush()
    if heap is not None:
        heap.finalize()
        tuning.D, tuning.I = heap.D, heap.I
    return parts


def _recall(found: np.ndarray, tuning: _Tuning, k: int = TUNE_K) -> float:
    """Mean recall@k of `found` against the exact neighbours, each query's own row left out of both."""
    total = 0.0
    for got, exact, own in zip(found, tuning.I, tuning.ids):
        want = [i for i in exact if i != own and i >= 0][:k]
        if want:
            total += len(set(want) & {i for i in got if i != own and i >= 0}) / len(want)
        else:
            total += 1.0
    return total / len(found)


def _candidates(index) -> tuple[str, list[int]]:
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    nlist = _nlist(index)
    steps = sorted({int(a * 2 ** e) for e in range(12) for a in (1, 1.5)})
    return "nprobe", [s for s in steps if s < nlist] + [nlist]


def _tune(index, tuning: _Tuning, target: float) -> tuple[str, float]:
    """The smallest search parameter whose recall@10 on the tuning queries reaches `target` with a margin:
    half the misses the target allows (0.975 for 0.95), because queries that are not vectors of the store
    (new images, texts) find fewer of their neighbours at the same setting. If none does: the smallest that
    reaches the best recall seen (with a warning when that is below the target itself)."""
    goal = target + (1 - target) * TUNE_MARGIN
    name, values = _candidates(index)
    space, k = faiss.ParameterSpace(), min(index.ntotal, TUNE_K + 1)
    seen: list[tuple[str, float]] = []
    for v in values:
        space.set_index_parameters(index, f"{name}={v}")
        recall = _recall(index.search(tuning.queries, k)[1], tuning)
        seen.append((f"{name}={v}", recall))
        if recall >= goal:
            return seen[-1][0], round(recall, 4)
        if len(seen) >= 4 and recall - seen[-4][1] < 0.002:  # no longer improving
            break
    best = max(r for _, r in seen)
    params, recall = next((p, r) for p, r in seen if r >= best - 0.002)
    if best < target:
        logger.warning("warning: this index reaches recall@10 %.3f at best, below the target %.3f: give a larger "
                       "memory budget for finer codes", best, target)
    return params, round(recall, 4)


__all__ = ["FEATURES", "INDEX_DIR", "INDEX_FILE", "INFO_FILE", "TUNING_FILE", "Hit", "IndexInfo", "StoreIndex",
           "build_index", "choose_factory", "faiss", "open_index", "parse_bytes"]
