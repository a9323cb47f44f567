"""The search deployment: one store's index (pipelines/index.py) per replica, on CPUs; the query vectors
come from the store's encoder deployment (embedder.py), which may be on a GPU.

    handle.info.remote()               -> {"dim", "count"}
    handle.search.remote(vectors, k)   -> per query, its k best hits: {"image_id", "path", "score", **kept columns}

Concurrent queries are searched together (`@serve.batch`: the index answers a matrix of queries at about
the cost of one), each batch at the largest k asked, each query's hits cut to its own k. The kept
columns' values are made JSON's: numpy values as Python's, bytes as base64, NaN as null.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import math
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from ray import serve

from pixelray.vector_index import INDEX_DIR, INFO_FILE, open_index
from pixelray.storage import split_uri

Query = tuple[np.ndarray, int]


def has_index(store: str) -> bool:
    """Whether the store has a committed index (its index.json), without reading the index."""
    fs, root, _ = split_uri(store)
    return fs.get_file_info(f"{root.rstrip('/')}/{INDEX_DIR}/{INFO_FILE}").type == pafs.FileType.File


@serve.deployment
class StoreSearch:
    def __init__(self, store: str, threads: int = 1, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005):
        self.index = open_index(store, threads=threads)  # as many faiss threads as the replica has CPUs
        self.search_batch.set_max_batch_size(max_batch_size)
        self.search_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def info(self) -> dict[str, int]:
        return {"dim": int(self.index.dim), "count": int(self.index.count)}

    async def search(self, vectors: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Each query's k nearest rows, best first (a ValueError for a query of the wrong dimension or k < 1)."""
        results = await asyncio.gather(*(self.search_batch((np.asarray(v, np.float32), k)) for v in vectors))
        for result in results:
            if isinstance(result, Exception):
                raise result
        return list(results)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def search_batch(self, queries: list[Query]) -> list[list[dict[str, Any]] | Exception]:
        try:
            rows = self.index.search(np.stack([v for v, _ in queries]), k=max(k for _, k in queries))
        except Exception as e:  # the same error for each query (say, a dimension mismatch)
            return [e] * len(queries)
        return [[hit_row(hit) for hit in hits[:k]] for hits, (_, k) in zip(rows, queries)]


def hit_row(hit) -> dict[str, Any]:
    """An index Hit as the /search result it becomes: its kept columns beside image_id, path and score."""
    row = {name: json_value(value) for name, value in hit.columns.items()}
    return {**row, "image_id": hit.image_id, "path": hit.path, "score": json_value(float(hit.score))}


def json_value(value: Any) -> Any:
    """A column's value as JSON can carry it."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)  # a Decimal, a timedelta: as text
