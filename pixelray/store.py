"""The Parquet output store shared by the batch jobs: layout, resume bookkeeping, atomic writes.

    OUT/
      pixelray.json        what produced the store (job, model, options); a resume must match it
      runs/*.json          one record per run of a job: when, how long, how many, how fast, errors by type
                           (`pixelray inspect OUT` prints them)
      <table>/*.parquet    good rows (features/, captions/ ...)
      errors/*.parquet     image_id, path, error_type, error: one row per bad image (per bad
                           item: image + question, keyed by item_id, for VQA)
      pixelray.lock        while a job runs: which job holds the store (lock.py)
      quarantine/<table>/  files a resume found unreadable, moved aside (their items are redone)

A job's rows carry an `error` column; `StoreSink` (pipelines/sink.py) routes rows with an error to
errors/ and the rest to the job's table, in files of at most `rows_per_file`
rows named `RUN-TASK-CHUNK.parquet`. Each file (the manifest too) is written under a hidden temporary
name, fsync'ed and then renamed, so a reader (or a resumed run) never sees a half-written file. A rerun
with resume reads the key column (image_id, or item_id for VQA) of both tables and
skips those items; a file it cannot read is moved to quarantine/ and its items are done again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pixelray.lock import StoreLock
from pixelray.storage import split_uri

ERRORS = "errors"
MANIFEST = "pixelray.json"
RUNS = "runs"  # run records (job.py writes one per run)
JOB_TABLES = {"caption": "captions", "embed": "features"}  # a store's table of good rows, by the job that wrote it
ERROR_CONTEXT = ("image_id", "path", "question")  # kept in errors/ when the job's rows have them
QUARANTINE = "quarantine"  # unreadable files found on resume are moved here

logger = logging.getLogger(__name__)


class Store:
    """An output directory (local path or any pyarrow filesystem URI) holding one job's tables."""

    def __init__(self, uri: str, table: str, key: str = "image_id"):
        self.uri, self.table, self.key = uri.rstrip("/"), table, key
        self.fs, self.root, _ = split_uri(self.uri)
        self.quarantined: list[tuple[str, str]] = []  # (file, where it was moved): unreadable on resume

    @classmethod
    def written(cls, uri: str) -> tuple[Store, dict[str, Any]]:
        """The store a job wrote at `uri`, on the table that job writes (JOB_TABLES), with its manifest;
        ValueError when `uri` holds no manifest."""
        manifest = cls(uri, "features").read_manifest()
        if not manifest:
            raise ValueError(f"{uri} is not a pixelray store: it has no {MANIFEST}")
        return cls(uri, JOB_TABLES.get(manifest.get("job"), "features")), manifest

    def dir(self, table: str) -> str:
        return f"{self.root}/{table}"

    def exists(self) -> bool:
        return any(self.fs.get_file_info(p).type != pafs.FileType.NotFound
                   for p in (self.dir(self.table), self.dir(ERRORS), f"{self.root}/{MANIFEST}"))

    def prepare(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        """Lock the store for this job (see lock.py; StoreLockedError while another job holds it), then
        create or check it: a resume must match the manifest; otherwise refuse to mix runs. The lock is
        held until `release()` (or the end of a `with store:` block)."""
        self.fs.create_dir(self.root, recursive=True)
        self._lock = StoreLock(self.fs, self.root, self.uri)
        self._lock.acquire()  # before anything is read, deleted or written
        try:
            self._prepare(manifest, resume=resume, overwrite=overwrite)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let another job open the store (idempotent)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __getstate__(self) -> dict:  # the sink travels to Ray's write tasks; the lock stays with the driver
        return {**self.__dict__, "_lock": None}

    def _prepare(self, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        if self.exists():
            if overwrite:
                for table in (self.table, ERRORS, RUNS):
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
        with atomic_output(self.fs, f"{self.root}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())

    def read_manifest(self) -> dict[str, Any]:
        try:
            with self.fs.open_input_stream(f"{self.root}/{MANIFEST}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return {}
        except ValueError as e:  # (written atomically now; a store of an older version may hold a torn one)
            raise ValueError(f"{self.uri}/{MANIFEST} cannot be read ({e}): it records the settings a resume must "
                             "match; restore it, or pass --overwrite to start the store again") from None

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
        """Sorted array (dtype S32) of every key (image_id, or item_id) already in the table or errors/.

        Each file's footer and key column are read: a file that cannot be read (truncated, say) is moved
        to OUT/quarantine/TABLE/, named in a warning and in `self.quarantined`, and its items are done
        again, rather than blocking the resume until someone deletes it by hand."""
        parts = []
        for table in (self.table, ERRORS):
            for path in self._files(table):
                try:
                    with self.fs.open_input_file(path) as f:
                        keys = pq.ParquetFile(f).read(columns=[self.key])[self.key]
                except FileNotFoundError:
                    continue  # gone since it was listed
                except Exception as e:
                    self._quarantine(table, path, e)
                    continue
                parts.append(keys.to_numpy(zero_copy_only=False))
        ids = np.concatenate(parts).astype("S32") if parts else np.array([], dtype="S32")
        return np.unique(ids)

    def _files(self, table: str) -> list[str]:
        """The visible files of a table: what `dataset()` reads (names starting with . or _ are not)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.dir(table), allow_not_found=True, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and not any(
            part.startswith((".", "_")) for part in i.path[len(self.dir(table)) + 1:].split("/")))

    def _quarantine(self, table: str, path: str, error: Exception) -> None:
        """Move an unreadable file out of the table (to OUT/quarantine/TABLE/) and say so."""
        folder = f"{self.root}/{QUARANTINE}/{table}"
        self.fs.create_dir(folder, recursive=True)
        dest = f"{folder}/{os.path.basename(path)}"
        while self.fs.get_file_info(dest).type != pafs.FileType.NotFound:
            dest = f"{folder}/{uuid.uuid4().hex[:6]}-{os.path.basename(path)}"
        self.fs.move(path, dest)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.warning("warning: %s cannot be read (%s); moved it to %s, and its items will be done again",
                       path, reason, dest)
        self.quarantined.append((path, dest))

    def forget_errors(self, error_types: Iterable[str]) -> int:
        """Take the error rows of these types (TRANSIENT: an LLM server down, ...) out of errors/, so
        that `stored_ids` leaves their items to be done again: each file that holds some is rewritten
        without them (atomically: write, then rename over it) or deleted when nothing else is left.
        Done before a resumed job starts, so an item is never in the store twice. Returns the rows taken."""
        types, forgotten = pa.array(sorted(set(error_types)), pa.string()), 0
        for path in self._files(ERRORS):
            try:
                table = pq.read_table(path, filesystem=self.fs)
            except Exception:
                continue  # (stored_ids quarantines what cannot be read)
            keep = pc.invert(pc.is_in(table["error_type"], value_set=types))
            kept = table.filter(keep)
            if kept.num_rows == table.num_rows:
                continue
            forgotten += table.num_rows - kept.num_rows
            if kept.num_rows:
                write_parquet_atomic(kept, self.fs, path)
            else:
                self.fs.delete_file(path)
        return forgotten

    def write_run_record(self, record: dict[str, Any]) -> str:
        """Record one run of the job (RUNS/<start time>-<id>.json, written atomically); returns its path."""
        name = f"{RUNS}/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
        self.fs.create_dir(self.dir(RUNS), recursive=True)
        with atomic_output(self.fs, f"{self.root}/{name}") as f:
            f.write(json.dumps(record, indent=2).encode())
        return name

    def run_records(self) -> list[dict[str, Any]]:
        """The runs recorded so far, oldest first."""
        sel = pafs.FileSelector(self.dir(RUNS), allow_not_found=True)
        records = []
        for info in sorted(self.fs.get_file_info(sel), key=lambda i: i.path):
            if info.path.endswith(".json") and not os.path.basename(info.path).startswith("."):
                with self.fs.open_input_stream(info.path) as f:
                    records.append(json.loads(f.read()))
        return records

    def count(self, table: str) -> tuple[int, int]:
        """(rows, files) in a table."""
        ds = self.dataset(table)
        return (ds.count_rows(), len(ds.files)) if ds is not None else (0, 0)


@contextlib.contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[Any]:
    """A file to write `path` through: written under a hidden temporary name in the same directory,
    then renamed into place, so a reader never sees it half-written. On a local (or NFS) filesystem
    the data is fsync'ed before the rename and the directory after it, so that a crash of the machine
    cannot leave a visible file with missing data; on an object store the upload is atomic itself."""
    directory, name = os.path.split(path)
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    local = isinstance(fs, pafs.LocalFileSystem)
    try:
        with open(tmp, "wb") if local else fs.open_output_stream(tmp) as f:
            yield f
            if local:
                f.flush()
                os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
            _fsync_dir(directory)
        else:
            fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:
            pass
        raise


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fixed_size_list(arr: np.ndarray) -> pa.Array:
    """[n, d] or [n, p, d] float32 array -> Arrow fixed-size list (of fixed-size lists)."""
    values: pa.Array = pa.array(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1))
    for size in reversed(arr.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def write_parquet_atomic(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    """Write a Parquet file atomically and durably (see atomic_output)."""
    with atomic_output(fs, path) as f:
        pq.write_table(table, f, compression="zstd")


CONDITION = re.compile(r"^(?P<column>[\w.]+)\s*(?P<op>!=|=|~)\s*(?P<value>.*)$")


def where_mask(table: pa.Table, conditions: list[str]) -> pa.Array:
    """The rows `conditions` (COLUMN=VALUE, COLUMN!=VALUE, COLUMN~TEXT) keep; ValueError for a bad one."""
    mask = pa.array(np.ones(table.num_rows, dtype=bool))
    for condition in conditions:
        m = CONDITION.match(condition)
        if m is None or m["column"] not in table.column_names:
            known = ", ".join(c for c in table.column_names if c not in ("embedding", "patch_features"))
            raise ValueError(f"--where {condition!r}: use COLUMN=VALUE, COLUMN!=VALUE or COLUMN~TEXT with a column "
                             f"of the store ({known})")
        column = pc.cast(table[m["column"]], pa.string())
        test = (pc.match_substring(column, m["value"]) if m["op"] == "~"
                else pc.equal(column, m["value"]) if m["op"] == "=" else pc.not_equal(column, m["value"]))
        mask = pc.and_(mask, pc.fill_null(test, False))
    return mask
