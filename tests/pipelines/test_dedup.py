"""`find_duplicates`: planted near-duplicates (resized and JPEG re-encoded copies) of distinct shapes scenes,
embedded by `pixelray embed` with the shapes CLIP, are found, every pair and no false one; the index path
agrees with exact search."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixelray import shapes
from pixelray.pipelines import dedup
from pixelray.pipelines.dedup import find_duplicates
from pixelray.pipelines.embed import EmbedConfig, run_embed
from pixelray.storage import excluded_ids
from pixelray.testing.stores import write_features


def _groups(table: list[dict]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for row in table:
        groups.setdefault(row["group"], []).append(Path(row["path"]).name)
    return sorted(sorted(g) for g in groups.values())


def test_planted_duplicates_found(ray_address, tmp_path):
    folder, captions, seed = tmp_path / "imgs", set(), 0
    folder.mkdir()
    while len(captions) < 8:  # distinct scenes: no two with the same caption
        rng = random.Random(seed)
        scene = shapes.random_scene(rng)
        seed += 1
        if shapes.caption(scene) not in captions:
            shapes.render(scene, rng, size=128).save(folder / f"scene{len(captions)}.png")
            captions.add(shapes.caption(scene))
    for i in range(3):
        original = Image.open(folder / f"scene{i}.png")
        original.resize((96, 96)).save(folder / f"scene{i}_small.png")
        original.save(folder / f"scene{i}_copy.jpg", quality=80)
    out = tmp_path / "store"  # the shipped shapes CLIP: copies score >= 0.997, distinct scenes <= 0.85
    run_embed(EmbedConfig(input=str(folder), out=str(out), encoder="shapes-clip", batch_size=8, address=ray_address))

    summary = find_duplicates(str(out), threshold=0.95)
    table = pq.read_table(out / "dedup.parquet").to_pylist()
    assert _groups(table) == [[f"scene{i}.png", f"scene{i}_copy.jpg", f"scene{i}_small.png"] for i in range(3)]
    assert sorted(Path(r["path"]).name for r in table if r["keep"]) == ["scene0.png", "scene1.png", "scene2.png"]
    assert (summary.images, summary.groups, summary.dropped, summary.method) == (14, 3, 6, "exact")
    assert excluded_ids(str(out)) == {r["image_id"] for r in table if not r["keep"]}


def test_index_path_agrees_with_exact(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x[100:104] = x[7] + 0.01 * rng.standard_normal((4, 16))  # a group of five
    x[300] = x[200] * 3  # same direction: similarity 1
    write_features(tmp_path, x)
    exact = find_duplicates(str(tmp_path), out=str(tmp_path / "exact.parquet"))
    monkeypatch.setattr(dedup, "EXACT_MAX", 0)
    through_index = find_duplicates(str(tmp_path))
    assert through_index.method.startswith("index Flat") and exact.method == "exact"
    assert (exact.groups, exact.dropped) == (through_index.groups, through_index.dropped) == (2, 5)
    assert pq.read_table(tmp_path / "exact.parquet").equals(pq.read_table(tmp_path / "dedup.parquet"))
    with pytest.raises(ValueError, match="does not exist"):
        excluded_ids(str(tmp_path / "features"))  # a folder without a dedup table
