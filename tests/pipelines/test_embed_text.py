"""`pixelray embed --text-column`: texts into the images' space; `--columns`: metadata kept beside embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixelray.encoders import create_encoder
from pixelray.images import image_id
from pixelray.pipelines.embed import EmbedConfig, run_embed
from pixelray.pipelines.embed_text import run_embed_text

SHAPES = Path(__file__).resolve().parents[2] / "examples/shapes"


def test_texts_of_a_caption_store_and_of_json_lines(ray_address, tiny_clip, tmp_path):
    captions = tmp_path / "captions-store"
    (captions / "captions").mkdir(parents=True)
    (captions / "pixelray.json").write_text(json.dumps({"job": "caption"}))
    pq.write_table(pa.table({"image_id": ["a" * 32, "b" * 32], "path": ["/x/a.png", "/x/b.png"],
                             "caption": ["a red star", "a blue circle"]}), captions / "captions/part-0.parquet")
    cfg = EmbedConfig(input=str(captions), out=str(tmp_path / "t1"), encoder=str(tiny_clip), text_column="caption",
                      normalize=True)
    assert (run_embed_text(cfg).written, run_embed_text(cfg.model_copy(update={"resume": True})).written) == (2, 0)
    rows = pq.read_table(tmp_path / "t1/features").sort_by("text_id").to_pylist()
    assert [(r["text_id"], r["image_id"], r["text"]) for r in rows] == [
        ("a" * 32, "a" * 32, "a red star"), ("b" * 32, "b" * 32, "a blue circle")]
    expected = create_encoder(str(tiny_clip), text=True, normalize=True).encode_text(["a red star", "a blue circle"])
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected.numpy(), rtol=1e-4, atol=1e-5)

    # JSON lines without ids: the image a row names gets the id `pixelray embed` gives that file; an empty
    # text is an error row; kept columns come along
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps(r) + "\n" for r in (
        {"image": "images/000000.png", "text": "a yellow star", "url": "u0"},
        {"image": "images/000001.png", "text": "  ", "url": "u1"},
        {"text": "no image", "url": "u2"})))
    res = run_embed_text(EmbedConfig(input=str(texts), out=str(tmp_path / "t2"), encoder=str(tiny_clip),
                                     text_column="text", columns=["url"]))
    assert (res.written, res.errors) == (2, 1)
    rows = {r["url"]: r for r in pq.read_table(tmp_path / "t2/features").to_pylist()}
    assert rows["u0"]["image_id"] == image_id(str(tmp_path / "images/000000.png"))
    assert rows["u2"]["image_id"] is None and rows["u2"]["text_id"] == image_id(f"{texts}#row:2")
    assert pq.read_table(tmp_path / "t2/errors")["error_type"].to_pylist() == ["empty_text"]

    with pytest.raises(ValueError, match="has no column 'caption'"):
        run_embed_text(EmbedConfig(input=str(texts), out=str(tmp_path / "t3"), encoder=str(tiny_clip),
                                   text_column="caption"))
    with pytest.raises(ValueError, match="no text tower"):
        run_embed_text(EmbedConfig(input=str(texts), out=str(tmp_path / "t3"), encoder="default", text_column="text"))


def test_columns_kept_from_parquet_shards_and_csv_lists(ray_address, tiny_clip, tmp_path):
    images = sorted((SHAPES / "images").glob("*.png"))[:4]
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"key": [p.name for p in images], "jpg": [p.read_bytes() for p in images],
                             "url": [f"https://example.com/{p.name}" for p in images],
                             "caption": [f"caption {i}" for i in range(4)]}), tmp_path / "shards/0.parquet")
    res = run_embed(EmbedConfig(input=str(tmp_path / "shards"), out=str(tmp_path / "s"), encoder=str(tiny_clip),
                                columns=["url", "caption"]))
    table = pq.read_table(tmp_path / "s/features").sort_by("path")
    assert res.written == 4 and table["url"].to_pylist() == [f"https://example.com/{p.name}" for p in images]
    assert table["caption"].to_pylist() == [f"caption {i}" for i in range(4)]

    for image in images:
        shutil.copy(image, tmp_path / image.name)
    (tmp_path / "list.tsv").write_text("path\tlicense\n" + "".join(f"{p.name}\tcc-by-{i}\n" for i, p in enumerate(images)))
    run_embed(EmbedConfig(input=str(tmp_path / "list.tsv"), out=str(tmp_path / "l"), encoder=str(tiny_clip),
                          columns="license"))
    table = pq.read_table(tmp_path / "l/features").sort_by("path")
    assert table["license"].to_pylist() == [f"cc-by-{i}" for i in range(4)]
    assert table["path"].to_pylist() == [str(tmp_path / p.name) for p in images]

    with pytest.raises(ValueError, match="has no column 'url'.*only Parquet shards and CSV/TSV"):
        run_embed(EmbedConfig(input=str(SHAPES / "images"), out=str(tmp_path / "x"), encoder=str(tiny_clip),
                              columns=["url"]))
    with pytest.raises(ValueError, match="its columns are license"):
        run_embed(EmbedConfig(input=str(tmp_path / "list.tsv"), out=str(tmp_path / "x"), encoder=str(tiny_clip),
                              columns=["url"]))
