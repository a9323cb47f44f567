"""Near-duplicate images of a feature store: groups of images whose embeddings are nearly the same, and the
one of each group to keep.

Run as:
    pixelray dedup STORE [--threshold 0.95] [--out STORE/dedup.parquet]

Two images are near-duplicates when the cosine similarity of their embeddings is at least `threshold`; a
group is a connected set of such pairs (a resized copy of a re-encoded copy is in its original's group).
The table written, STORE/dedup.parquet (or `out`), has one row per image in a group of two or more:

    image_id, path    the image
    group             the group's number (0, 1, ...)
    keep              True for the one image of its group to keep: the first by path

Images not in it are unique. `pixelray caption --exclude` and a training config's `data.exclude` leave out
its images with keep == False (pixelray.storage.excluded_ids reads it).

Stores of up to EXACT_MAX rows are compared exactly (faiss range search over every pair). Larger ones go
through the store's index (built, or brought up to date, first: `pixelray index STORE`): each image's
NEIGHBOURS nearest images are its candidates, so a group larger than that is still found whole as long as
its members link up through their nearest ones (copies of one image do).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pixelray.pipelines.index import StoreFeatures, build_index, faiss, open_index
from pixelray.store import write_parquet_atomic
from pixelray.storage import DEDUP_TABLE, split_uri

EXACT_MAX = 50_000  # rows compared all against all
NEIGHBOURS = 16  # candidates per image through the index, larger stores
QUERY_ROWS = 4096  # queries per faiss call
SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("group", pa.int64()), ("keep", pa.bool_())])


@dataclass
class DedupSummary:
    images: int  # rows of the store compared
    groups: int  # near-duplicate groups (of 2 or more)
    dropped: int  # images to leave out (keep == False): in_groups - groups
    in_groups: int
    threshold: float
    method: str  # "exact" or "index IVF4096,Flat (nprobe=24)"
    out: str
    seconds: float

    def __str__(self) -> str:
        return (f"pixelray dedup: {self.images} images, {self.groups} near-duplicate groups "
                f"({self.in_groups} images), {self.dropped} to drop at similarity >= {self.threshold} "
                f"({self.method}) in {self.seconds:.1f} s\n  table: {self.out}")


def find_duplicates(store_uri: str, threshold: float = 0.95, out: str | None = None) -> DedupSummary:
    """Find the near-duplicate groups of a feature store and write their table (see the module's docstring)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold {threshold} must be a cosine similarity in (0, 1]")
    t0 = time.time()
    src = StoreFeatures(store_uri)
    if not src.files:
        raise ValueError(f"{src.uri} has no rows to compare (features/ is empty)")
    n = sum(src.rows(f) for f in src.files)
    if n == 0:
        raise ValueError(f"{src.uri} has no rows to compare (its feature files are empty)")
    if n <= EXACT_MAX:
        ids, paths, pairs = _exact_pairs(src, threshold)
        method = "exact"
    else:
        ids, paths, pairs, method = _index_pairs(src, threshold)
    table = _groups(ids, paths, pairs)
    out = out or f"{src.uri}/{DEDUP_TABLE}"
    fs, path, _ = split_uri(out)
    fs.create_dir(os.path.dirname(path), recursive=True)
    write_parquet_atomic(table, fs, path)
    groups = len(pc.unique(table["group"])) if table.num_rows else 0
    return DedupSummary(images=len(ids), groups=groups, dropped=table.num_rows - groups, in_groups=table.num_rows,
                        threshold=threshold, method=method, out=out, seconds=time.time() - t0)


def _exact_pairs(src: StoreFeatures, threshold: float) -> tuple[list, list, np.ndarray]:
    """Every pair at similarity >= threshold, by range search over all the store's vectors."""
    vectors, ids, paths = [], [], []
    for name in src.files:
        for x, rows in src.read(name):
            vectors.append(x)
            ids += rows["image_id"].to_pylist()
            paths += rows["path"].to_pylist()
    x = np.concatenate(vectors)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    pairs = []
    for start in range(0, len(x), QUERY_ROWS):
        lims, _, found = index.range_search(x[start:start + QUERY_ROWS], np.nextafter(threshold, -1, dtype=np.float32))
        queries = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        pairs.append(np.stack([queries, found], axis=1))
    return ids, paths, np.concatenate(pairs)


def _index_pairs(src: StoreFeatures, threshold: float) -> tuple[list, list, np.ndarray, str]:
    """Pairs at similarity >= threshold among each image's NEIGHBOURS nearest, through the store's index."""
    build_index(src.uri)
    index = open_index(src.uri)
    pairs, row = [], 0
    for name in index.info.files:
        for x, _ in src.read(name, with_rows=False):
            for start in range(0, len(x), QUERY_ROWS):
                scores, found = index.index.search(x[start:start + QUERY_ROWS], NEIGHBOURS)
                queries = np.repeat(np.arange(row + start, row + start + len(scores)), NEIGHBOURS)
                hit = (scores.ravel() >= threshold) & (found.ravel() >= 0)
                pairs.append(np.stack([queries[hit], found.ravel()[hit]], axis=1))
            row += len(x)
    method = f"index {index.info.factory}" + (f" ({index.info.search_params})" if index.info.search_params else "")
    return index.rows["image_id"].to_pylist(), index.rows["path"].to_pylist(), np.concatenate(pairs), method


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Each node's component label (the smallest node in it): label propagation with pointer jumping."""
    labels = np.arange(n)
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        low = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        while not np.array_equal(labels, labels[labels]):
            labels = labels[labels]
        if np.array_equal(labels, before):
            return labels


def _groups(ids: list, paths: list, pairs: np.ndarray) -> pa.Table:
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    labels = _components(len(ids), pairs)
    sizes = np.bincount(labels, minlength=len(ids))
    members: dict[int, list[int]] = {}
    for i in np.flatnonzero(sizes[labels] > 1):
        members.setdefault(int(labels[i]), []).append(int(i))
    by_path = sorted((sorted(m, key=lambda i: (paths[i] is None, paths[i] or "", ids[i] or "")) for m in
                      members.values()), key=lambda m: (paths[m[0]] is None, paths[m[0]] or "", ids[m[0]] or ""))
    rows = [(ids[i], paths[i], g, j == 0) for g, m in enumerate(by_path) for j, i in enumerate(m)]
    return pa.Table.from_pylist([dict(zip(SCHEMA.names, r)) for r in rows], schema=SCHEMA)
