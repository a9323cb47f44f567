"""Feature stores written directly in `pixelray embed`'s format (pixelray/store.py), for the tests and
benchmarks of what reads a store (index, search, dedup) without running an encoder over images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_features(out: str | Path, vectors: np.ndarray, *, name: str = "part-00000", first: int = 0,
                   encoder: str = "synthetic", compression: str = "zstd", **columns: list) -> Path:
    """Write vectors [n, dim] as one features/NAME.parquet file of a store (the manifest too, if missing):
    image_id img-<row> and path /images/<row>.png from row number `first` on, plus any `columns`."""
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    (out / "errors").mkdir(exist_ok=True)
    if not (out / "pixelray.json").exists():
        (out / "pixelray.json").write_text(json.dumps({"job": "embed", "encoder": encoder, "normalize": False}))
    n, dim = vectors.shape
    rows = range(first, first + n)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    table = pa.table({
        "image_id": pa.array([f"img-{i:08d}" for i in rows], pa.string()),
        "path": pa.array([f"/images/{i:08d}.png" for i in rows], pa.string()),
        "encoder": pa.array([encoder] * n, pa.string()),
        "width": pa.array(np.full(n, 64), pa.int32()),
        "height": pa.array(np.full(n, 64), pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        **{k: pa.array(v) for k, v in columns.items()},
    })
    path = out / "features" / f"{name}.parquet"
    pq.write_table(table, path, compression=compression)
    return path
