"""Files by local path or URI, on every filesystem pyarrow knows (file://, s3://, gs://, hdfs://, ...):
what the batch jobs read and write, and where training reads its images."""

from __future__ import annotations

import os
import stat

import pyarrow.fs as pafs


def split_uri(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix that turns the path back into a URI)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), ""
    fs, path = pafs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    return fs, path, "" if scheme == "file" else f"{scheme}://"


class NotARegularFileError(OSError):
    """A folder, device, FIFO or socket where a file was expected: it is never opened (a FIFO would
    block the reader, a device such as /dev/zero never ends)."""

    code = "not_a_file"


class FileTooLargeError(OSError):
    """A file over the byte limit: refused from its size before it is read, or when a capped read overflows."""

    code = "too_large"


def _what(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> str:
    if info.type == pafs.FileType.Directory:
        return "a folder"
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0
        for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                           (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
            if test(mode):
                return name
    return "not a regular file"


def check_regular_file(fs: pafs.FileSystem, path: str, info: pafs.FileInfo | None = None) -> pafs.FileInfo:
    """`path`'s file info if it is a regular file; FileNotFoundError or NotARegularFileError otherwise,
    found from the filesystem's metadata alone (nothing is opened)."""
    info = info if info is not None else fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file: {path}")
    if info.type != pafs.FileType.File:
        raise NotARegularFileError(f"{path} is {_what(fs, path, info)}, not a regular file; not read")
    return info


def too_large(size: int | None, max_bytes: int) -> FileTooLargeError:
    size_text = f"{size:,} bytes" if size is not None else f"more than {max_bytes:,} bytes"
    return FileTooLargeError(f"file is {size_text}, over the limit of {max_bytes:,} bytes")


def read_file(fs: pafs.FileSystem, path: str, max_bytes: int, info: pafs.FileInfo | None = None) -> bytes:
    """The bytes of a regular file of at most `max_bytes`. The type and size are checked before the
    file is opened, and the read is capped at max_bytes + 1 whatever the size said, so neither a
    folder, device or FIFO nor an oversized (or growing, or lying) file costs more than the limit in
    memory. Raises FileNotFoundError, NotARegularFileError, FileTooLargeError or another OSError."""
    info = check_regular_file(fs, path, info)
    if info.size is not None and info.size > max_bytes:
        raise too_large(info.size, max_bytes)
    cap = max_bytes + 1
    with fs.open_input_stream(path) as f:
        # a read of n bytes allocates n up front: ask for the size the file said (one more shows growth)
        data = f.read(cap if info.size is None else info.size + 1)
        if info.size is not None and len(data) > info.size:  # it grew since: go on, up to the cap
            data += f.read(cap - len(data))
    if len(data) > max_bytes:
        raise too_large(None, max_bytes)
    return data


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """A file's bytes (at most `limit` of them); OSError (or ValueError, for a bad URI) when it cannot be
    read, NotARegularFileError (an OSError) without opening it when it is not a regular file."""
    fs, path, _ = split_uri(uri)
    check_regular_file(fs, path)
    with fs.open_input_stream(path) as f:
        return f.read() if limit is None else f.read(limit)


DEDUP_TABLE = "dedup.parquet"  # what `pixelray dedup STORE` writes in the store (pipelines/dedup.py)


def excluded_ids(uri: str) -> set[str]:
    """The image_ids an exclusion table leaves out: a `pixelray dedup` table's rows whose `keep` is false (the
    other images of each near-duplicate group), or every image_id of a Parquet table without `keep`. `uri` is
    the table, or a store that holds one (STORE/dedup.parquet). ValueError when it is neither."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path, _ = split_uri(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        path = f"{path.rstrip('/')}/{DEDUP_TABLE}"
    try:
        names = pq.read_schema(path, filesystem=fs).names
    except FileNotFoundError:
        raise ValueError(f"exclusion table {uri!r} does not exist (make one with `pixelray dedup STORE`)") from None
    except Exception as e:
        raise ValueError(f"exclusion table {uri!r} is not a Parquet file: {e}") from None
    if "image_id" not in names:
        raise ValueError(f"exclusion table {uri!r} has no image_id column (a `pixelray dedup` table has one)")
    table = pq.read_table(path, filesystem=fs, columns=["image_id"] + (["keep"] if "keep" in names else []))
    drop = [not keep for keep in table["keep"].to_pylist()] if "keep" in names else [True] * table.num_rows
    return {i for i, d in zip(table["image_id"].to_pylist(), drop) if d and i}
