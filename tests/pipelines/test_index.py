"""`build_index` / `open_index`: a store written by `pixelray embed` searched by its own vectors, an update after
the store grows that adds without retraining, and clear errors for what cannot be indexed or searched."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pixelray.pipelines.embed import EmbedConfig, run_embed
from pixelray.pipelines.index import INDEX_DIR, INDEX_FILE, build_index, faiss, open_index
from pixelray.testing.images import write_folder
from pixelray.testing.stores import write_features


def _clusters(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    return (centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


def _centroids(store) -> np.ndarray:
    index = faiss.read_index(str(store / INDEX_DIR / INDEX_FILE))
    quantizer = faiss.extract_index_ivf(index).quantizer
    return quantizer.reconstruct_n(0, quantizer.ntotal)


def test_index_of_an_embedded_store(ray_address, tiny_clip, tmp_path):
    write_folder(tmp_path / "imgs", n_good=6, bad=False)
    out = tmp_path / "store"
    run_embed(EmbedConfig(input=str(tmp_path / "imgs"), out=str(out), encoder=str(tiny_clip), batch_size=3,
                          address=ray_address))
    info = build_index(str(out))
    assert (info.action, info.factory, info.count, info.dim) == ("built", "Flat", 6, 32)
    assert info.encoder == json.loads((out / "pixelray.json").read_text())["encoder"]

    index = open_index(str(out))
    feats = pq.read_table(out / "features").to_pylist()
    hits = index.search(np.array([r["embedding"] for r in feats], np.float32), k=3)
    assert [h[0].image_id for h in hits] == [r["image_id"] for r in feats]  # each image's nearest is itself
    assert [h[0].path for h in hits] == [r["path"] for r in feats]
    assert all(h[0].score == pytest.approx(1.0, abs=1e-5) and len(h) == 3 for h in hits)
    assert hits[0][0].columns == {}  # image_id and path are fields; encoder, width, height are not kept
    assert index.manifest["job"] == "embed" and (index.dim, index.count) == (32, 6)


def test_update_adds_new_files_without_retraining(tmp_path):
    x = _clusters(3000, 32, seed=0)
    write_features(tmp_path, x[:2000], name="run1", caption=[f"c{i}" for i in range(2000)])
    first = build_index(str(tmp_path), factory="IVF16,Flat")
    assert (first.action, first.count, first.files) == ("built", 2000, ["run1.parquet"])
    assert first.search_params.startswith("nprobe=") and first.recall_at_10 >= 0.95
    centroids = _centroids(tmp_path)

    write_features(tmp_path, x[2000:], name="run2", first=2000, caption=[f"c{i}" for i in range(2000, 3000)])
    second = build_index(str(tmp_path))  # a resumed embed wrote run2: only its rows are added
    assert (second.action, second.added, second.count, second.updates) == ("updated", 1000, 3000, 1)
    assert second.created == first.created and len(second.parts) == 2
    np.testing.assert_array_equal(_centroids(tmp_path), centroids)  # not trained again
    assert build_index(str(tmp_path)).action == "unchanged"

    index = open_index(str(tmp_path))
    hits = index.search(x[[5, 2500]], k=1)
    assert [(h[0].image_id, h[0].columns["caption"]) for h in hits] == [("img-00000005", "c5"),
                                                                         ("img-00002500", "c2500")]
    assert build_index(str(tmp_path), rebuild=True).action == "built"


def test_bad_stores_and_queries(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a pixelray store"):
        build_index(str(tmp_path / "empty"))
    (tmp_path / "captions" / "captions").mkdir(parents=True)
    (tmp_path / "captions" / "pixelray.json").write_text(json.dumps({"job": "caption"}))
    with pytest.raises(ValueError, match="has no features/ table .it is a caption store"):
        build_index(str(tmp_path / "captions"))
    (tmp_path / "nothing" / "features").mkdir(parents=True)
    with pytest.raises(ValueError, match="no rows to index"):
        build_index(str(tmp_path / "nothing"))
    write_features(tmp_path / "noemb", np.zeros((3, 4), np.float32))
    pq.write_table(pq.read_table(tmp_path / "noemb/features/part-00000.parquet").drop_columns(["embedding"]),
                   tmp_path / "noemb/features/part-00000.parquet")
    with pytest.raises(ValueError, match="has no embedding column"):
        build_index(str(tmp_path / "noemb"))

    write_features(tmp_path / "ok", _clusters(50, 32, seed=1))
    with pytest.raises(ValueError, match="has no index: run `pixelray index"):
        open_index(str(tmp_path / "ok"))
    build_index(str(tmp_path / "ok"))
    index = open_index(str(tmp_path / "ok"))
    with pytest.raises(ValueError, match="query has 64 dims, the index 32"):
        index.search(np.ones((1, 64), np.float32))
    with pytest.raises(ValueError, match="empty query"):
        index.search(np.zeros((0, 32), np.float32))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(np.ones(32, np.float32), k=0)
