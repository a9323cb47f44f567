"""The Parquet output store shared by the batch jobs: layout, resume bookkeeping, atomic writes.

    OUT/
      pixelray.json        what produced the store (job, model, options); a resume must match it
      <table>/*.parquet    good rows (features/, captions/ ...)
      errors/*.parquet     image_id, path, error_type, error: one row per bad image (per bad
                           item: image + question, keyed by item_id, for VQA)

A job's rows carry an `error` column; `StoreSink` routes rows with an error to
errors/ and the rest to the job's table, in files of at most `rows_per_file`
rows named `RUN-TASK-CHUNK.parquet`. Each file is written under a hidden temporary name and then
renamed, so a reader (or a resumed run) never sees a half-written file. A rerun
with resume reads the key column (image_id, or item_id for VQA) of both tables and
skips those items.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from pixelray.storage import split_uri

ERRORS = "errors"
MANIFEST = "pixelray.json"
ERROR_CONTEXT = ("image_id", "path", "question")  # kept in errors/ when the job's rows have them


class Store:
    """An output directory (local path or any pyarrow filesystem URI) holding one job's tables."""

    def __init__(self, uri: str, table: str, key: str = "image_id"):
        self.uri, self.table, self.key = uri.rstrip("/"), table, key
        self.fs, self.root, _ = split_uri(self.uri)

    def dir(self, table: str) -> str:
        return f"{self.root}/{table}"

    def exists(self) -> bool:
        return any(self.fs.get_file_info(p).type != pafs.FileType.NotFound
                   for p in (self.dir(self.table), self.dir(ERRORS), f"{self.root}/{MANIFEST}"))

    def prepare(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        """Create or check the store: a resume must match the manifest; otherwise refuse to mix runs."""
        if self.exists():
            if overwrite:
                for table in (self.table, ERRORS):
                    if self.fs.get_file_info(self.dir(table)).type == pafs.FileType.Directory:
                        self.fs.delete_dir(self.dir(table))
            elif not resume:
                raise FileExistsError(
                    f"{self.uri} already holds a store; pass --resume to continue it or --overwrite to replace it"
                )
            else:
                old = self.read_manifest()
                diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
                if diff:
                    detail = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
                    raise ValueError(f"cannot resume {self.uri} with different settings ({detail})")
                self._remove_partial_files()
        for table in (self.table, ERRORS):
            self.fs.create_dir(self.dir(table), recursive=True)
        with self.fs.open_output_stream(f"{self.root}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())

    def read_manifest(self) -> dict[str, Any]:
        try:
            with self.fs.open_input_stream(f"{self.root}/{MANIFEST}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return {}

    def _remove_partial_files(self) -> None:
        """Temporary files of a killed run: they were never visible, and are not needed."""
        for table in (self.table, ERRORS):
            sel = pafs.FileSelector(self.dir(table), allow_not_found=True)
            for info in self.fs.get_file_info(sel):
                if os.path.basename(info.path).startswith(".") and info.path.endswith(".tmp"):
                    self.fs.delete_file(info.path)

    def dataset(self, table: str) -> pads.Dataset | None:
        """A pyarrow dataset over a table's complete files (hidden temporaries are ignored)."""
        if self.fs.get_file_info(self.dir(table)).type != pafs.FileType.Directory:
            return None
        ds = pads.dataset(self.dir(table), filesystem=self.fs, format="parquet")
        return ds if ds.files else None

    def stored_ids(self) -> np.ndarray:
        """Sorted array (dtype S32) of every key (image_id, or item_id) already in the table or errors/."""
        parts = []
        for table in (self.table, ERRORS):
            ds = self.dataset(table)
            if ds is not None:
                parts.append(ds.to_table(columns=[self.key])[self.key].to_numpy(zero_copy_only=False))
        ids = np.concatenate(parts).astype("S32") if parts else np.array([], dtype="S32")
        return np.unique(ids)

    def count(self, table: str) -> tuple[int, int]:
        """(rows, files) in a table."""
        ds = self.dataset(table)
        return (ds.count_rows(), len(ds.files)) if ds is not None else (0, 0)

    def sink(self, rows_per_file: int) -> "StoreSink":
        return StoreSink(self, rows_per_file)


def write_parquet_atomic(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    """Write under a hidden temporary name in the same directory, then rename into place."""
    directory, name = os.path.split(path)
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f, compression="zstd")
    fs.move(tmp, path)


@dataclass
class WriteStats:
    rows: int = 0
    errors: int = 0
    files: list[str] = field(default_factory=list)


class StoreSink(Datasink[WriteStats]):
    """Ray Data sink: good rows to the store's table, rows with an `error` to errors/."""

    def __init__(self, store: Store, rows_per_file: int):
        self.store, self.rows_per_file = store, rows_per_file
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.stats = WriteStats()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> WriteStats:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        stats = WriteStats()
        if not tables:
            return stats
        table = pa.concat_tables(tables, promote_options="default")
        failed = pc.is_valid(table["error"])
        good = table.filter(pc.invert(failed)).drop_columns(["error_type", "error"])
        context = [c for c in (self.store.key, *ERROR_CONTEXT) if c in table.column_names]
        bad = table.filter(failed).select(list(dict.fromkeys(context)) + ["error_type", "error"])
        for sub, part in ((ERRORS, bad), (self.store.table, good)):
            for chunk, start in enumerate(range(0, part.num_rows, self.rows_per_file)):
                name = f"{sub}/{self.run_id}-{ctx.task_idx:06d}-{chunk:04d}.parquet"
                write_parquet_atomic(part.slice(start, self.rows_per_file), self.store.fs,
                                     f"{self.store.root}/{name}")
                stats.files.append(name)
        stats.rows, stats.errors = good.num_rows, bad.num_rows
        return stats

    def on_write_complete(self, write_result) -> None:
        for s in write_result.write_returns:
            self.stats.rows += s.rows
            self.stats.errors += s.errors
            self.stats.files += s.files
