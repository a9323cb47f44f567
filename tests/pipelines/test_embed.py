"""`pixelray embed` end to end: the CLI, the Parquet schema, errors, resume, and a killed driver."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pixelray.encoders import create_encoder
from pixelray.images import decode_image, image_id
from pixelray.pipelines.embed import EmbedConfig, run_embed
from pixelray.testing.images import write_folder
from pixelray.testing.processes import kill_session

PIXELRAY = str(Path(sys.executable).parent / "pixelray")


def _read(path: Path) -> pa.Table:
    return pq.read_table(path) if path.exists() and any(path.glob("*.parquet")) else None


def test_cli_end_to_end_with_patches(ray_address, tiny_clip, tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=7)
    out = tmp_path / "store"
    proc = subprocess.run(
        [PIXELRAY, "embed", str(tmp_path / "imgs"), "--out", str(out), "--encoder", str(tiny_clip),
         "--patches", "--normalize", "--batch-size", "3", "--address", ray_address],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_bad = len(info["errors"])
    assert f"7 images embedded, {n_bad} errors" in proc.stdout
    assert "images/s" in proc.stdout and f"{out}/features" in proc.stdout

    feats = pq.read_table(out / "features")
    schema = feats.schema
    assert schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert schema.field("patch_features").type == pa.list_(pa.list_(pa.float32(), 64), 16)
    assert schema.field("width").type == pa.int32() and schema.field("image_id").type == pa.string()
    assert "error" not in schema.names
    assert sorted(feats["path"].to_pylist()) == sorted(str(p) for p in info["good"])
    assert set(feats["encoder"].to_pylist()) == {str(tiny_clip)}
    assert set(zip(feats["width"].to_pylist(), feats["height"].to_pylist())) == {(48, 40)}

    # every row holds the features of its own image (no mix-up across batches or actors)
    enc = create_encoder(str(tiny_clip), normalize=True)
    rows = feats.to_pylist()
    images = [decode_image(Path(r["path"]).read_bytes()) for r in rows]
    expected = enc(images)
    got = torch.tensor(np.array([r["embedding"] for r in rows], dtype=np.float32))
    torch.testing.assert_close(got, expected.embedding, rtol=1e-4, atol=1e-5)
    got_patches = torch.tensor(np.array([r["patch_features"] for r in rows], dtype=np.float32))
    torch.testing.assert_close(got_patches, expected.patches, rtol=1e-4, atol=1e-5)
    assert all(r["image_id"] == image_id(r["path"]) for r in rows)

    errors = pq.read_table(out / "errors").to_pylist()
    assert {Path(e["path"]).name: e["error_type"] for e in errors} == info["errors"]
    assert all(e["error"] for e in errors)


def test_store_rules_resume_and_no_patches(ray_address, tiny_dinov2, tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=5, bad=False)
    cfg = EmbedConfig(input=str(tmp_path / "imgs"), out=str(tmp_path / "s"), encoder=str(tiny_dinov2),
                      batch_size=2, rows_per_file=2)
    first = run_embed(cfg)
    assert (first.written, first.errors, first.previously_stored) == (5, 0, 0)
    feats = pq.read_table(tmp_path / "s/features")
    assert "patch_features" not in feats.schema.names and feats.num_rows == 5
    assert len(list((tmp_path / "s/features").glob("*.parquet"))) >= 3  # at most 2 rows per file

    with pytest.raises(FileExistsError, match="--resume"):
        run_embed(cfg)
    with pytest.raises(ValueError, match="patches: stored False, now True"):
        run_embed(cfg.model_copy(update={"resume": True, "patches": True}))

    write_folder(tmp_path / "imgs" / "more", n_good=2, bad=False)  # new images arrive
    again = run_embed(cfg.model_copy(update={"resume": True}))
    assert (again.written, again.previously_stored) == (2, 5)
    ids = pq.read_table(tmp_path / "s/features")["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 7

    fresh = run_embed(cfg.model_copy(update={"overwrite": True, "patches": True}))
    assert fresh.written == 7 and "patch_features" in pq.read_table(tmp_path / "s/features").schema.names
    assert len(info["good"]) == 5


def test_tar_shards_end_to_end(ray_address, tiny_clip, tmp_path):
    import io
    import tarfile

    from pixelray.testing.images import bad_files, encode, random_rgb

    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards/0.tar", "w") as tar:
        members = {f"{i}.jpg": encode(random_rgb(seed=i), "JPEG") for i in range(4)}
        members["bomb.png"] = bad_files()["bomb.png"][0]
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    res = run_embed(EmbedConfig(input=str(tmp_path / "shards"), out=str(tmp_path / "s"),
                                encoder=str(tiny_clip)))
    assert (res.written, res.errors) == (4, 1)
    err = pq.read_table(tmp_path / "s/errors").to_pylist()[0]
    assert err["path"] == f"{tmp_path}/shards/0.tar#bomb.png" and err["error_type"] == "decompression_bomb"


def _photo(width: int, height: int, seed: int):
    """A smooth gradient with noise and a few flat rectangles: a photo's content, at any size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([xx * rng.uniform(50, 255), yy * rng.uniform(50, 255), (xx + yy) / 2 * rng.uniform(50, 255)], -1)
    pixels += rng.normal(0, 6, pixels.shape)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - width // 5), rng.integers(0, height - height // 5)
        pixels[y0:y0 + height // 5, x0:x0 + width // 5] = rng.uniform(0, 255, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def test_large_images_are_downscaled_as_they_are_decoded(ray_address, tiny_clip, tiny_dinov2, tmp_path):
    """The decode stage holds an image at twice the encoder's input on its short side, never at full
    size, and records the full size; the embeddings are those of the full-size images within resampling
    noise, for open_clip's preprocessing and a transformers image processor alike."""
    from pixelray.encoders import resolve_encoder
    from pixelray.images import FILE_LIMITS, ImageFit
    from pixelray.pipelines.decode import decode_rows
    from pixelray.pipelines.embed import decode_batch

    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"wide.jpg": (3000, 2000), "tall.png": (1200, 2400), "strip.jpg": (4000, 500), "small.jpg": (48, 40)}
    for i, (name, size) in enumerate(sizes.items()):
        _photo(*size, seed=i).save(folder / name, quality=90)
    paths = sorted(folder.iterdir())
    batch = {"data": np.array([p.read_bytes() for p in paths], dtype=object), "path": np.array(paths, dtype=object),
             "error_type": np.array([""] * len(paths)), "error": np.array([""] * len(paths))}
    decoded = decode_rows(batch, FILE_LIMITS, ImageFit(short_side=64))  # (tiny encoders: 32 px inputs)
    held = {"wide.jpg": (96, 64), "tall.png": (64, 128), "strip.jpg": (512, 64), "small.jpg": (48, 40)}
    assert [decoded.images[i].size for i in range(len(paths))] == [held[p.name] for p in paths]
    assert list(zip(decoded.width, decoded.height)) == [sizes[p.name] for p in paths]

    full = [decode_image(p.read_bytes()) for p in paths]
    for model in (tiny_clip, tiny_dinov2):  # the stage itself: its pixels are the model's own, within noise
        spec = resolve_encoder(str(model))
        pixels = decode_batch(batch, spec.model_dump_json(), FILE_LIMITS)["pixel_values"]
        expected = spec.preprocessor()(full)
        assert np.abs(pixels - expected).mean() < 0.01 and np.abs(pixels - expected).max() < 0.3

    result = run_embed(EmbedConfig(input=str(folder), out=str(tmp_path / "s"), encoder=str(tiny_clip), batch_size=2))
    assert (result.written, result.errors) == (4, 0)
    rows = sorted(pq.read_table(tmp_path / "s" / "features").to_pylist(), key=lambda r: r["path"])
    assert [(r["width"], r["height"]) for r in rows] == [sizes[p.name] for p in paths]
    got = torch.tensor(np.array([r["embedding"] for r in rows], dtype=np.float32))
    expected = create_encoder(str(tiny_clip))(full).embedding  # the full-size images, the model's own resize
    relative = (got - expected).norm(dim=1) / expected.norm(dim=1)
    assert relative.max() < 0.02, relative  # measured: at most 0.003
    assert relative[[p.name for p in paths].index("small.jpg")] < 1e-5  # not resized at all


def test_bad_encoder_fails_before_reading(ray_address, tmp_path, capsys):
    from pixelray.cli import main

    write_folder(tmp_path / "imgs", n_good=1, bad=False)
    assert main(["embed", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--encoder", "dinov2-large"]) == 2
    assert "huggingface-cli download facebook/dinov2-large" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_resume_after_driver_is_killed(ray_address, tmp_path):
    """kill -9 of a driver (with its own local Ray) mid-job, then --resume: each image exactly once."""
    info = write_folder(tmp_path / "imgs", n_good=160, size=(64, 64))
    out = tmp_path / "store"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    cmd = [PIXELRAY, "embed", str(tmp_path / "imgs"), "--out", str(out), "--encoder", "default",
           "--batch-size", "4", "--rows-per-file", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            table = _read(out / "features")
            if table is not None and table.num_rows >= 8:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        kill_session(proc)

    rows_at_kill = _read(out / "features").num_rows
    assert 8 <= rows_at_kill < 160
    for table_dir in ("features", "errors"):  # no half-written file is visible
        for f in (out / table_dir).glob("*.parquet"):
            pq.read_metadata(f)

    res = run_embed(EmbedConfig(input=str(tmp_path / "imgs"), out=str(out), encoder="default",
                                batch_size=8, resume=True))
    feats, errors = pq.read_table(out / "features"), pq.read_table(out / "errors")
    assert res.previously_stored >= rows_at_kill
    assert sorted(feats["path"].to_pylist()) == sorted(str(p) for p in info["good"])  # exactly once
    assert sorted(Path(p).name for p in errors["path"].to_pylist()) == sorted(info["errors"])  # once
    assert not list(out.glob("*/.*.tmp"))  # leftovers of the killed run are cleaned on resume
