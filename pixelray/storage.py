"""Files by local path or URI, on every filesystem pyarrow knows (file://, s3://, gs://, hdfs://, ...):
what the batch jobs read and write, and where training reads its images."""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def split_uri(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix that turns the path back into a URI)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), ""
    fs, path = pafs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    return fs, path, "" if scheme == "file" else f"{scheme}://"


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """A file's bytes (at most `limit` of them); OSError (or ValueError, for a bad URI) when it cannot be read."""
    fs, path, _ = split_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read() if limit is None else f.read(limit)
