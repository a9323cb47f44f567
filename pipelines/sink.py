"""The Ray Data sink of the batch jobs: each block's good rows to the store's table, its rows with an `error` to
errors/, in atomically written files (the store's layout: pixelray/store.py)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from pixelray.store import ERROR_CONTEXT, ERRORS, Store, write_parquet_atomic


@dataclass
class WriteStats:
    rows: int = 0
    errors: int = 0
    files: list[str] = field(default_factory=list)
    error_types: dict[str, int] = field(default_factory=dict)  # error rows by error_type


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
        stats.error_types = {kind: int(n) for kind, n in zip(*np.unique(bad["error_type"].to_numpy(zero_copy_only=False),
                                                                          return_counts=True))}
        return stats

    def on_write_complete(self, write_result) -> None:
        for s in write_result.write_returns:
            self.stats.rows += s.rows
            self.stats.errors += s.errors
            self.stats.files += s.files
            for kind, n in s.error_types.items():
                self.stats.error_types[kind] = self.stats.error_types.get(kind, 0) + n
