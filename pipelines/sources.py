"""Where images come from: a folder, a glob, a list file, or Parquet / tar shards.

`resolve_input(uri)` lists the input once on the driver through a pyarrow
filesystem (local paths, file://, s3://, gs://, hdfs:// ... all by construction)
and classifies it. `read_images(source, ...)` turns it into a Ray Dataset of
raw image bytes with columns `image_id`, `path`, `data`, `error_type`, `error`
(empty strings when there is no error): a file that cannot be read becomes a row
with an error, never an exception. Nothing is read before its type and size are
checked, and every read is capped at the byte limit: a folder, device, FIFO or
socket is a `not_a_file` row (never opened), a file or tar member over the limit a
`too_large` row (from its size or tar header; the tar stream goes on).

Every image has a stable `path`: the file's absolute path or URI, or
`SHARD#MEMBER` for an image inside a tar shard and `SHARD#KEY` (or `SHARD#ROW`)
for one inside a Parquet shard (`SHARD#row:N` for a row whose key is null or empty).
`image_id` is a hash of it, so reruns can skip what is already stored. A path that
comes twice (a line repeated in a list file, a question asked twice of one image,
two tar members or Parquet keys of one name) is read once: each later copy is given
the distinct path `PATH#N` (N = 2, 3, ...) and becomes a `duplicate` error row, so
no two rows ever share an id.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray
from fsspec.utils import glob_translate

from pixelray.images import FILE_LIMITS, IMAGE_EXTENSIONS, image_id
from pixelray.storage import check_regular_file, read_file, split_uri, too_large

LIST_EXTENSIONS = (".txt", ".lst", ".list", ".csv", ".tsv")  # .csv/.tsv: a header, a path column, metadata
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
PARQUET_KEY_COLUMNS = ("path", "key", "__key__", "id", "image_id", "file_name", "filename", "url")
SHARD_BATCH_ROWS = 64

SourceKind = Literal["files", "parquet", "tar"]


@dataclass
class Source:
    kind: SourceKind
    uris: list[str]  # image files, or shard files, as stable absolute paths / URIs
    filesystem: pafs.FileSystem
    skipped_files: int = 0  # non-image files ignored while listing a folder
    questions: list[str] | None = None  # VQA: one question per entry of `uris` (files only)
    # entries that are error rows without being read: index in `uris` -> (error_type, error)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)
    # metadata kept beside each image (--columns): per entry (files), or the shard columns read with each image
    columns: dict[str, list] = field(default_factory=dict)
    keep: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.uris)


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _list_files(fs: pafs.FileSystem, base: str) -> list[str]:
    """Everything but folders under `base` (hidden names left out): devices, FIFOs and sockets are
    listed too, to become `not_a_file` error rows (or shard rows) rather than vanish silently."""
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(
        i.path for i in infos
        if i.type in (pafs.FileType.File, pafs.FileType.Unknown)
        and not any(part.startswith((".", "_")) for part in i.path[len(base):].split("/"))
    )


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def resolve_input(uri: str, columns: list[str] | tuple[str, ...] = ()) -> Source:
    """List and classify an input, with the metadata `columns` to keep beside each image (from Parquet shards or
    a CSV/TSV list); raises ValueError with a clear message when it is unusable."""
    fs, paths, prefix, from_folder = list_input(uri)
    if len(paths) == 1 and not from_folder and not _has_glob(split_uri(uri)[1]) and _ext(paths[0]) in LIST_EXTENSIONS:
        source = _from_list_file(fs, paths[0], prefix, uri)
    else:
        source = _classify([prefix + p for p in paths], fs, uri, from_folder)
    return _keep_columns(source, list(columns), uri)


def _keep_columns(source: Source, columns: list[str], uri: str) -> Source:
    if source.kind == "parquet" and source.uris and columns:
        with source.filesystem.open_input_file(_fs_path(source.uris[0])) as f:
            have = pq.ParquetFile(f).schema_arrow.names
        source.keep = columns
    else:
        have = list(source.columns)
    if missing := [c for c in columns if c not in have]:
        where = (f"its columns are {', '.join(have)}" if have else
                 "only Parquet shards and CSV/TSV lists (a header line, a path column) carry columns")
        raise ValueError(f"input {uri!r} has no column {missing[0]!r}: {where}")
    source.columns = {c: source.columns[c] for c in columns if c in source.columns}
    return source


def list_input(uri: str) -> tuple[pafs.FileSystem, list[str], str, bool]:
    """The files a folder (everything under it but hidden names), a glob or a file names: the filesystem,
    their paths on it, the URI prefix that makes them URIs again, and whether a folder was listed."""
    fs, path, prefix = split_uri(uri)
    if _has_glob(path):
        cut = min(path.index(c) for c in "*?[" if c in path)
        base = path[: path.rfind("/", 0, cut)] or "/"
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise ValueError(f"input {uri!r}: {prefix}{base} is not a directory")
        pattern = re.compile(glob_translate(path))  # shell-style, `**` for any number of folders
        return fs, [p for p in _list_files(fs, base) if pattern.match(p)], prefix, False
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.Directory:
        return fs, _list_files(fs, path), prefix, True
    if info.type != pafs.FileType.File:
        raise ValueError(f"input {uri!r} is not a regular file, folder or glob (a device, FIFO or socket?)")
    return fs, [path], prefix, False


def _from_list_file(fs: pafs.FileSystem, path: str, prefix: str, uri: str) -> Source:
    columns: dict[str, list] = {}
    if _ext(path) in (".csv", ".tsv"):  # a header line; the path column, and metadata columns
        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter="\t" if _ext(path) == ".tsv" else ","))
        path_col = next((c for c in PARQUET_KEY_COLUMNS + ("image",) if c in table.column_names), None)
        if path_col is None:
            raise ValueError(f"list {uri!r} has no path column (one of {', '.join(PARQUET_KEY_COLUMNS)}, image)")
        lines = [str(p) for p in table[path_col].to_pylist()]
        columns = {c: table[c].to_pylist() for c in table.column_names if c != path_col}
    else:
        with fs.open_input_stream(path) as f:
            lines = f.read().decode("utf-8").splitlines()
        lines = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    entries, fs = _resolve_entries(lines, fs, path, prefix, uri)
    # A list names its files explicitly: every entry is attempted, whatever its extension.
    return _mark_duplicates(Source("files", entries, fs, columns=columns)) if entries else _classify([], fs, uri, False)


def _mark_duplicates(source: Source) -> Source:
    """Later copies of an entry (of an image and question, with questions) get the distinct path
    `PATH#N` and become `duplicate` error rows: each item is read once and no two rows share an id."""
    seen: set[tuple[str, str | None]] = set()  # (path, question)
    first: dict[tuple[str, str | None], int] = {}  # -> the entry that named it first
    for i, uri in enumerate(source.uris):
        question = None if source.questions is None else source.questions[i]
        path = _distinct(uri, seen, question)
        if path != uri:
            what = uri if question is None else f"{uri} with the question {question!r}"
            source.errors[i] = ("duplicate", f"{what} is named again (entry {i + 1}, first at entry "
                                             f"{first[uri, question] + 1}); only the first is read")
            source.uris[i] = path
        first[path, question] = i
    return source


def _resolve_entries(entries: list[str], fs: pafs.FileSystem, listing: str, prefix: str,
                     uri: str) -> tuple[list[str], pafs.FileSystem]:
    """Paths named in a listing file: URIs as they are, absolute paths on the listing's filesystem,
    relative paths against the listing's folder. Returns them with the filesystem that reads them."""
    base = os.path.dirname(listing)
    out = []
    for entry in entries:
        if "://" in entry:
            out.append(entry)
        elif entry.startswith("/"):
            out.append(prefix + entry.lstrip("/") if prefix else os.path.normpath(entry))
        else:
            out.append(prefix + os.path.normpath(f"{base}/{entry}"))
    schemes = {e.split("://", 1)[0] if "://" in e else "" for e in out}
    if len(schemes) > 1:
        raise ValueError(f"{uri!r} mixes filesystems ({', '.join(sorted(schemes))}); use one per job")
    if out and "://" in out[0] and not prefix:
        fs = split_uri(out[0])[0]
    return out, fs


def resolve_questions(uri: str) -> Source:
    """A VQA questions file (JSON lines or Parquet) of rows {"image": PATH, "question": TEXT}."""
    fs, path, prefix = split_uri(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ValueError(f"questions file {uri!r} does not exist")
    try:
        if _ext(path) == ".parquet":
            table = pq.read_table(path, filesystem=fs)
        else:
            with fs.open_input_stream(path) as f:
                table = pajson.read_json(f)
    except Exception as e:
        raise ValueError(f"questions file {uri!r} is not JSON lines or Parquet: {e}") from None
    image_col = next((c for c in ("image", "path", "file_name") if c in table.column_names), None)
    if image_col is None or "question" not in table.column_names:
        raise ValueError(f"questions file {uri!r} needs columns 'image' and 'question' "
                         f"(has {', '.join(table.column_names)})")
    images, questions = table[image_col].to_pylist(), table["question"].to_pylist()
    bad = next((i for i, (im, q) in enumerate(zip(images, questions)) if not im or not q), None)
    if bad is not None:
        raise ValueError(f"questions file {uri!r}: row {bad} has an empty image or question")
    entries, fs = _resolve_entries([str(i) for i in images], fs, path, prefix, uri)
    return _mark_duplicates(Source("files", entries, fs, questions=[str(q) for q in questions]))


def _classify(uris: list[str], fs: pafs.FileSystem, uri: str, from_folder: bool) -> Source:
    images = [u for u in uris if _ext(u) in IMAGE_EXTENSIONS]
    parquet = [u for u in uris if _ext(u) == ".parquet"]
    tars = [u for u in uris if _ext(u) == ".tar"]
    if from_folder:
        if images:
            return Source("files", images, fs, skipped_files=len(uris) - len(images))
        if parquet or tars:
            return Source("parquet", parquet, fs) if parquet else Source("tar", tars, fs)
        raise ValueError(f"input {uri!r}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                         "Parquet or tar shards found")
    if not uris:
        raise ValueError(f"input {uri!r} matches no files")
    if (parquet and tars) or ((parquet or tars) and len(parquet) + len(tars) != len(uris)):
        raise ValueError(f"input {uri!r} mixes image files, Parquet and tar shards; give one kind per job")
    if parquet:
        return Source("parquet", parquet, fs)
    if tars:
        return Source("tar", tars, fs)
    return Source("files", uris, fs)  # explicitly named files are all attempted


def _fs_path(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


COLUMNS = ("image_id", "path", "data", "error_type", "error")


def _columns(rows: list[tuple], keep: list[str] = ()) -> dict[str, list]:
    """Rows of (image_id, path, data, error_type, error[, kept values]) -> a batch of columns."""
    batch = {name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)}
    for j, name in enumerate(keep):
        batch[name] = [row[5][j] if len(row) > 5 else None for row in rows]
    return batch


def read_files(batch: dict[str, np.ndarray], filesystem: pafs.FileSystem,
               max_bytes: int = FILE_LIMITS.max_bytes) -> dict[str, list]:
    """Read each file's bytes (see pixelray.storage.read_file: type and size checked first, the read
    capped); a file that cannot be read becomes an error row, and a row that arrives with an error
    (a duplicate entry) is not read. Other columns pass through."""
    rows = []
    for uri, iid, kind, err in zip(batch["path"], batch["image_id"], batch["error_type"], batch["error"]):
        data = b""
        if not err:
            try:
                data = read_file(filesystem, _fs_path(uri), max_bytes)
            except Exception as e:
                kind = getattr(e, "code", "unreadable")
                err = str(e) if kind != "unreadable" else f"cannot read file: {e}"
        rows.append((iid, uri, data, kind, err))
    return {**batch, **_columns(rows)}


def _new_rows(rows: list[tuple], done: np.ndarray, keep: list[str] = ()) -> dict[str, list] | None:
    """Rows of (path, data, error_type, error[, kept values]) whose ids are not in `done`, as a batch (None if
    none)."""
    ids = [image_id(r[0]) for r in rows]
    new = ~_isin(np.array(ids, dtype="S32"), done)
    kept = [(iid, *row) for k, iid, row in zip(new, ids, rows) if k]
    return _columns(kept, keep) if kept else None


def read_shards(batch: dict[str, np.ndarray], filesystem: pafs.FileSystem, kind: SourceKind,
                done_ref: ray.ObjectRef | np.ndarray, max_bytes: int = FILE_LIMITS.max_bytes,
                keep: list[str] = ()) -> Iterator[dict[str, list]]:
    """Stream the images out of each shard in small batches, skipping ids already stored."""
    done = ray.get(done_ref) if isinstance(done_ref, ray.ObjectRef) else done_ref
    for shard in batch["path"]:
        rows: list[tuple] = []
        for row in _shard_rows(filesystem, shard, kind, max_bytes, keep):
            rows.append(row)
            if len(rows) >= SHARD_BATCH_ROWS:
                if (out := _new_rows(rows, done, keep)) is not None:
                    yield out
                rows = []
        if rows and (out := _new_rows(rows, done, keep)) is not None:
            yield out


def _distinct(path: str, seen: set[tuple[str, str | None]], tag: str | None = None) -> str:
    """`path`, or when it was seen already (with the same `tag`: a question) the first free `path#N`
    (N = 2, 3, ...); added to `seen`."""
    out, n = path, 1
    while (out, tag) in seen:
        n += 1
        out = f"{path}#{n}"
    seen.add((out, tag))
    return out


def _shard_rows(fs: pafs.FileSystem, shard: str, kind: SourceKind, max_bytes: int,
                keep: list[str] = ()) -> Iterator[tuple]:
    """Rows of (path, data, error_type, error[, kept values]) of one shard; a shard that is not a regular file
    is one error row, and is never opened."""
    try:
        check_regular_file(fs, _fs_path(shard))
    except Exception as e:
        yield f"{shard}#", b"", getattr(e, "code", "unreadable_shard"), f"cannot read shard: {e}"
        return
    yield from _tar_members(fs, shard, max_bytes) if kind == "tar" else _parquet_rows(fs, shard, max_bytes, keep)


def _tar_kind(member: tarfile.TarInfo) -> str:
    for test, name in ((member.issym, "a symbolic link"), (member.islnk, "a hard link"), (member.isfifo, "a FIFO"),
                       (member.ischr, "a character device"), (member.isblk, "a block device")):
        if test():
            return name
    return "not a regular file"


def _tar_members(fs: pafs.FileSystem, shard: str, max_bytes: int) -> Iterator[tuple]:
    """Image members of a tar shard, streamed. A member's size comes from its header: one over the
    limit is an error row and is skipped unread (a sparse 1 GiB member costs nothing), and so are a
    link or device and a second member of a name already seen (under a distinct `SHARD#NAME#N`)."""
    seen: set[tuple[str, str | None]] = set()
    try:
        with fs.open_input_stream(_fs_path(shard)) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isdir() or _ext(member.name) not in IMAGE_EXTENSIONS:
                    continue
                first = f"{shard}#{member.name}"
                path = _distinct(first, seen)
                if path != first:
                    yield path, b"", "duplicate", (f"tar member {member.name!r} appears again in the shard; only "
                                                   "its first copy is read")
                elif not member.isfile():
                    yield path, b"", "not_a_file", f"tar member {member.name!r} is {_tar_kind(member)}; not read"
                elif member.size > max_bytes:
                    yield path, b"", "too_large", f"{too_large(member.size, max_bytes)} (from the tar header; not read)"
                else:
                    yield path, tar.extractfile(member).read(member.size + 1), "", ""  # at most the header's size
    except Exception as e:  # a corrupt shard is recorded, the job goes on
        yield f"{shard}#", b"", "unreadable_shard", f"cannot read tar shard (rest of shard lost): {e}"


def _parquet_rows(fs: pafs.FileSystem, shard: str, max_bytes: int, keep: list[str] = ()) -> Iterator[tuple]:
    """Image cells of a Parquet shard, SHARD_BATCH_ROWS rows at a time. A row is named by its key, or
    its row number (`row:N` where the key is null or empty); a second row of one key is a `duplicate`
    error row under a distinct `SHARD#KEY#N`, a cell over the limit a `too_large` one."""
    seen: set[tuple[str, str | None]] = set()
    try:
        pf = pq.ParquetFile(fs.open_input_file(_fs_path(shard)))
        names = pf.schema_arrow.names
        image_col = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
        if image_col is None:
            raise ValueError(f"no image column (looked for {', '.join(PARQUET_IMAGE_COLUMNS)})")
        key_col = next((c for c in PARQUET_KEY_COLUMNS if c in names), None)
        columns = list(dict.fromkeys([image_col] + ([key_col] if key_col else []) + list(keep)))
        row = 0
        for rb in pf.iter_batches(columns=columns, batch_size=SHARD_BATCH_ROWS):
            images = rb.column(image_col)
            if pa.types.is_struct(images.type):  # Hugging Face datasets: {bytes, path}
                images = images.field("bytes")
            keys = rb.column(key_col).to_pylist() if key_col else range(row, row + rb.num_rows)
            kept = list(zip(*(rb.column(c).to_pylist() for c in keep))) if keep else [()] * rb.num_rows
            for n, data, key, values in zip(range(row, row + rb.num_rows), images.to_pylist(), keys, kept):
                first = f"{shard}#{key}" if key is not None and key != "" else f"{shard}#row:{n}"
                path = _distinct(first, seen)
                if path != first:
                    yield path, b"", "duplicate", (f"key {key!r} appears again in the shard (row {n}); only its "
                                                   "first row is read")
                elif data and len(data) > max_bytes:
                    yield path, b"", "too_large", f"{too_large(len(data), max_bytes)} (row {n})"
                else:
                    yield path, data or b"", "", "", values
            row += rb.num_rows
    except Exception as e:
        yield f"{shard}#", b"", "unreadable_shard", f"cannot read Parquet shard (rest of shard lost): {e}"


def _isin(ids: np.ndarray, done_sorted: np.ndarray) -> np.ndarray:
    """Membership of each id in a sorted id array (binary search: millions of ids, little memory)."""
    if not len(done_sorted) or not len(ids):
        return np.zeros(len(ids), dtype=bool)
    pos = np.searchsorted(done_sorted, ids).clip(max=len(done_sorted) - 1)
    return done_sorted[pos] == ids


def item_ids(source: Source) -> tuple[list[str], list[str]]:
    """(image ids, item ids) of a files source: an item is an image, or an (image, question) pair."""
    images = [image_id(u) for u in source.uris]
    if source.questions is None:
        return images, images
    return images, [image_id(f"{u}\n{q}") for u, q in zip(source.uris, source.questions)]


def read_images(source: Source, done: np.ndarray, rows_per_block: int = 256,
                max_bytes: int = FILE_LIMITS.max_bytes, task_args: dict | None = None) -> ray.data.Dataset:
    """Dataset of raw image bytes whose item ids are not in `done` (a sorted array of S32 ids); a file
    or member over `max_bytes` is a `too_large` error row, never read whole. `task_args`: the reading
    tasks' Ray options (the job's bounded retries: the same as the decode stage's, so the two fuse).

    Columns: image_id, path, data, error_type, error; with questions also item_id and question.
    """
    if source.kind == "files":
        images, items = item_ids(source)
        keep = ~_isin(np.array(items, dtype="S32"), done)
        columns = {"image_id": images, "path": source.uris}
        if source.questions is not None:
            columns.update(item_id=items, question=source.questions)
        preset = [source.errors.get(i, ("", "")) for i in range(len(source))]
        columns.update(error_type=[k for k, _ in preset], error=[e for _, e in preset], **source.columns)
        table = pa.table(columns).filter(pa.array(keep))
        blocks = [table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)]
        return ray.data.from_arrow(blocks).map_batches(
            read_files, fn_kwargs={"filesystem": source.filesystem, "max_bytes": max_bytes}, batch_size=None,
            batch_format="numpy", **(task_args or {}),
        )
    shards = ray.data.from_items([{"path": u} for u in source.uris], override_num_blocks=len(source.uris))
    return shards.map_batches(
        read_shards, batch_size=1, batch_format="numpy",
        fn_kwargs={"filesystem": source.filesystem, "kind": source.kind, "done_ref": ray.put(done),
                   "max_bytes": max_bytes, "keep": source.keep},
        **(task_args or {}),
    )
