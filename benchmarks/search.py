"""Vector search: recall@10 against exact search, build time, memory and query latency of the indexes
`pixelray index` builds, at 10k, 100k and 1M vectors of 512 dims, in one run.

Run as:
    python benchmarks/search.py [--sizes 10000,100000,1000000] [--queries 1000] [--json runs/search.json]
                                [--variants-up-to 100000] [--threads 1]

Data: synthetic embeddings that have neighbours, as real ones do (uniform random vectors in 512 dims have
none: every pair is nearly orthogonal). Each vector is a point of a mixture of n/100 gaussian clusters (1,000
to 10,000), L2-normalised: a mean direction shared by all (as an encoder's embeddings share one) + its cluster's
centre (centres come in groups of ~10 related ones) + a variation of the cluster's own along 12 directions, as
wide as the distance between centres, so that clusters overlap + a little isotropic noise. Unrelated pairs
score ~0.1, a query's nearest neighbour ~0.75 and its 10th ~0.55; an inverted file needs to probe several
lists for recall@10 0.95. The queries are held-out points of the same mixture (not in the store), with more
isotropic noise.

For each size the vectors are written as a feature store in `pixelray embed`'s format (1,000-row zstd
Parquet files and a pixelray.json manifest), and `build_index` builds the index it picks for the default
memory budget (what users run: `pixelray index STORE`); then, up to --variants-up-to vectors, each other kind
(exact Flat, IVF with Flat, SQ8 and PQ128 codes, HNSW32) through the same builder (`factory=`). Each build and
each search run in a fresh process, so that their memory is their own. Measured per index:
- build: seconds of `build_index` (training, adding file by file, tuning nprobe / efSearch on sample queries
  from the store, writing) and the peak resident memory of the process that built it;
- memory: the index's bytes (index.faiss), and the resident memory of a process that opened it (in brackets:
  over that process's memory before it opened the index);
- recall@10 of the held-out queries against exact search (faiss IndexFlatIP over the same vectors, computed
  file by file);
- latency: p50 and p99 of one query at a time through `StoreIndex.search` (normalisation, faiss, row lookup),
  with faiss on --threads OpenMP threads (1: a server answers concurrent requests on one core each);
- load: the machine's 1-minute load average when the row was measured (other work on the same cores slows
  builds and widens p99).
A markdown table is printed and the figures are written as JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pixelray.pipelines.index import FLAT_MAX, build_index, faiss, ivf_lists, open_index
from pixelray.testing.stores import write_features

DIM = 512
ROWS_PER_FILE = 1000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Mixture:
    """The synthetic embedding distribution (see the module's docstring); deterministic for a seed."""

    def __init__(self, n: int, dim: int = DIM, seed: int = 0, rank: int = 12):
        rng = np.random.default_rng(seed)
        self.k, self.dim, self.rank, self.seed = int(np.clip(n // 100, 1000, 10000)), dim, rank, seed
        self.mean = _unit(rng.standard_normal(dim))
        groups = _unit(rng.standard_normal((self.k // 10, dim)))  # clusters come in related groups
        own = 0.8 * _unit(rng.standard_normal((self.k, dim)))
        self.centres = _unit(groups[rng.integers(0, len(groups), self.k)] + own)
        scales = np.linspace(1.0, 0.3, rank)[:, None] / np.sqrt(dim)
        self.bases = (rng.standard_normal((self.k, rank, dim)) * scales).astype(np.float32)

    def sample(self, m: int, seed: int, noise: float = 0.05) -> np.ndarray:
        rng = np.random.default_rng([self.seed, seed])
        labels = rng.integers(0, self.k, m)
        x = 0.7 * self.mean + self.centres[labels] + noise * 8 * rng.standard_normal((m, self.dim)) / np.sqrt(self.dim)
        for i in range(0, m, 8192):  # each cluster varies along 12 directions of its own
            z = rng.standard_normal((min(8192, m - i), self.rank)).astype(np.float32)
            x[i:i + 8192] += np.einsum("mr,mrd->md", z, self.bases[labels[i:i + 8192]])
        return _unit(x).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_store(folder: Path, mixture: Mixture, n: int) -> None:
    chunk = 50_000
    for start in range(0, n, chunk):
        x = mixture.sample(min(chunk, n - start), seed=start)
        for i in range(0, len(x), ROWS_PER_FILE):
            write_features(folder, x[i:i + ROWS_PER_FILE], name=f"part-{(start + i) // ROWS_PER_FILE:06d}",
                           first=start + i)


def exact_neighbours(folder: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Ids of the exact top-k of each query over the store's vectors, in index order (file by file)."""
    import pyarrow.parquet as pq

    heap, offset = faiss.ResultHeap(len(queries), k, keep_max=True), 0
    for path in sorted((folder / "features").glob("*.parquet")):
        col = pq.read_table(path, columns=["embedding"])["embedding"].combine_chunks()
        x = col.flatten().to_numpy().reshape(len(col), -1)
        scores, ids = faiss.knn(queries, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids + offset)
        offset += len(x)
    heap.finalize()
    return heap.I


def _build(folder: str, factory: str | None) -> dict:
    """In a process of its own: build the index; its time and the process's peak memory."""
    t = time.perf_counter()
    info = build_index(folder, factory=factory, rebuild=True)
    return {"info": info.model_dump(), "build_s": time.perf_counter() - t, "build_peak_rss": peak_rss_bytes()}


def _search(folder: str, queries: np.ndarray, threads: int) -> dict:
    """In a process of its own, as a server would: open the index; its memory, results and latencies."""
    base = rss_bytes()
    index = open_index(folder, threads=threads)
    rss = rss_bytes()
    found = [[int(h.image_id[4:]) for h in hits] for hits in index.search(queries, k=10)]  # img-<row>
    for q in queries[:20]:  # warm-up
        index.search(q[None], k=10)
    lat = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], k=10)
        lat.append(time.perf_counter() - t)
    return {"found": found, "lat": lat, "rss": rss, "rss_over_base": rss - base}


def _in_child(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def measure(folder: Path, queries: np.ndarray, exact: np.ndarray, factory: str | None, threads: int) -> dict:
    built = _in_child(_build, str(folder), factory)
    info = built["info"]
    searched = _in_child(_search, str(folder), queries, threads)
    recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(searched["found"], exact)]))
    lat = searched["lat"]
    return {"n": info["count"], "index": info["factory"], "params": info["search_params"] or "exact",
            "tuned_recall": info["recall_at_10"], "recall_at_10": round(recall, 4),
            "build_s": round(built["build_s"], 1), "build_peak_rss_bytes": built["build_peak_rss"],
            "index_bytes": info["index_bytes"], "rss_bytes": searched["rss"],
            "rss_over_base_bytes": searched["rss_over_base"],
            "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3), "default": factory is None,
            "load_average": round(os.getloadavg()[0], 1)}


def variants(n: int) -> list[str]:
    nlist = ivf_lists(max(n, FLAT_MAX))
    return ["Flat", f"IVF{nlist},Flat", f"IVF{nlist},SQ8", f"IVF{nlist},PQ{DIM // 4}", "HNSW32"]


def table(rows: list[dict]) -> str:
    head = ("| vectors | index | search params | recall@10 | build s | build peak RSS MiB | index MiB "
            "| search RSS MiB | p50 ms | p99 ms | load |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['n']:,} | {r['index']}{' (default)' if r['default'] else ''} | {r['params']} | "
             f"{r['recall_at_10']:.3f} | {r['build_s']:.1f} | {r['build_peak_rss_bytes'] / 2**20:.0f} | "
             f"{r['index_bytes'] / 2**20:.0f} | {r['rss_bytes'] / 2**20:.0f} (+{r['rss_over_base_bytes'] / 2**20:.0f}) "
             f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['load_average']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--variants-up-to", type=int, default=100_000,
                    help="also build the other index kinds for sizes up to this (0: none)")
    ap.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads while searching")
    ap.add_argument("--json", default="runs/search-benchmark.json")
    ap.add_argument("--workdir", default=None, help="where the synthetic stores are written (default: a temp dir)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="pixelray-search-"))
    rows: list[dict] = []
    cpus = len(os.sched_getaffinity(0))
    print(f"# search benchmark: {DIM} dims, {args.queries} held-out queries, {cpus} CPUs, faiss {faiss.__version__}")
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            folder = work / f"store-{n}"
            shutil.rmtree(folder, ignore_errors=True)
            mixture = Mixture(n)
            t = time.perf_counter()
            write_store(folder, mixture, n)
            queries = mixture.sample(args.queries, seed=-1 % 2**32, noise=0.08)
            exact = exact_neighbours(folder, queries)
            print(f"# {n:,} vectors in {mixture.k} clusters: store written and exact neighbours found in "
                  f"{time.perf_counter() - t:.0f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
            default = measure(folder, queries, exact, None, args.threads)
            rows.append(default)
            print(table([default]).splitlines()[-1], flush=True)
            if n <= args.variants_up_to:
                for factory in variants(n):
                    if factory != default["index"]:
                        rows.append(measure(folder, queries, exact, factory, args.threads))
                        print(table([rows[-1]]).splitlines()[-1], flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    print(f"\npeak RSS of the run: {peak_rss_bytes() / 2**30:.1f} GiB")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"dim": DIM, "queries": args.queries, "cpus": cpus, "rows": rows}, indent=2))
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
