"""Input resolution (folder, glob, list file, shards) and the Ray Data readers."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixelray.images import image_id
from pixelray.pipelines.sources import read_images, resolve_input
from pixelray.testing.images import encode, random_rgb, write_folder

NO_IDS = np.array([], dtype="S32")


def test_folder_lists_images_recursively_and_skips_other_files(tmp_path):
    write_folder(tmp_path / "a", n_good=3, bad=False)
    write_folder(tmp_path / "a" / "nested", n_good=2, bad=False)
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"x")
    src = resolve_input(str(tmp_path / "a"))
    assert src.kind == "files" and len(src) == 5
    assert src.skipped_files == 2  # the two notes.md
    assert all(u.startswith(str(tmp_path)) for u in src.uris)


def test_file_uri_and_glob(tmp_path):
    write_folder(tmp_path / "x", n_good=4, bad=False)
    write_folder(tmp_path / "x" / "deep", n_good=3, bad=False)
    assert len(resolve_input(f"{tmp_path}/x/*.jpg")) == 2  # img_0000, img_0003; not nested
    assert len(resolve_input(f"{tmp_path}/x/**/*.png")) == 2
    assert len(resolve_input(f"file://{tmp_path}/x")) == 7
    with pytest.raises(ValueError, match="matches no files"):
        resolve_input(f"{tmp_path}/x/*.gif")


def test_list_file_resolves_relative_paths_and_keeps_every_entry(tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=3, bad=False)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\nimgs/{info['good'][0].name}\n\n{info['good'][1]}\nimgs/missing.jpg\n")
    src = resolve_input(str(lst))
    assert src.uris == [str(info["good"][0]), str(info["good"][1]), str(tmp_path / "imgs/missing.jpg")]


def test_missing_and_mixed_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_input(str(tmp_path / "nope"))
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="no images"):
        resolve_input(str(tmp_path / "e"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m/a.tar").write_bytes(b"")
    (tmp_path / "m/b.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes"):
        resolve_input(f"{tmp_path}/m/*")


def _tar_shard(path, n, start=0):
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            for name, data in ((f"{i:05d}.jpg", encode(random_rgb(seed=i), "JPEG")), (f"{i:05d}.txt", b"cap")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_read_files_turns_unreadable_into_error_rows(ray_address, tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=3, bad=False)
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([str(p) for p in info["good"]] + [str(tmp_path / "gone.jpg")]))
    rows = {r["path"]: r for r in read_images(resolve_input(str(lst)), NO_IDS, rows_per_block=2).take_all()}
    assert len(rows) == 4
    assert rows[str(tmp_path / "gone.jpg")]["error_type"] == "unreadable"
    assert rows[str(info["good"][0])]["data"] == info["good"][0].read_bytes()
    assert rows[str(info["good"][0])]["image_id"] == image_id(str(info["good"][0]))


def test_read_skips_ids_already_done(ray_address, tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=5, bad=False)
    done = np.sort(np.array([image_id(str(p)) for p in info["good"][:3]], dtype="S32"))
    rows = read_images(resolve_input(str(tmp_path / "imgs")), done).take_all()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in info["good"][3:])


def test_tar_shards(ray_address, tmp_path):
    (tmp_path / "shards").mkdir()
    _tar_shard(tmp_path / "shards/000.tar", 3)
    _tar_shard(tmp_path / "shards/001.tar", 2, start=3)
    (tmp_path / "shards/002.tar").write_bytes(b"not a tar at all" * 100)
    src = resolve_input(str(tmp_path / "shards"))
    assert src.kind == "tar" and len(src) == 3
    done = np.array([image_id(f"{tmp_path}/shards/000.tar#00001.jpg")], dtype="S32")
    rows = read_images(src, done).take_all()
    paths = sorted(r["path"] for r in rows if not r["error"])
    assert paths == [f"{tmp_path}/shards/000.tar#0000{i}.jpg" for i in (0, 2)] + [
        f"{tmp_path}/shards/001.tar#0000{i}.jpg" for i in (3, 4)]
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["error_type"] == "unreadable_shard" and "002.tar" in bad[0]["path"]


def test_parquet_shards_with_hf_struct_and_plain_columns(ray_address, tmp_path):
    (tmp_path / "pq").mkdir()
    imgs = [encode(random_rgb(seed=i), "PNG") for i in range(4)]
    struct = pa.array([{"bytes": b, "path": f"p{i}.png"} for i, b in enumerate(imgs[:2])])
    pq.write_table(pa.table({"image": struct, "path": ["a/0.png", "a/1.png"]}), tmp_path / "pq/0.parquet")
    pq.write_table(pa.table({"jpg": imgs[2:], "other": [1, 2]}), tmp_path / "pq/1.parquet")  # no key: row index
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "pq/2.parquet")  # no image column
    rows = {r["path"]: r for r in read_images(resolve_input(str(tmp_path / "pq")), NO_IDS).take_all()}
    shard0, shard1, shard2 = (f"{tmp_path}/pq/{i}.parquet" for i in range(3))
    assert rows[f"{shard0}#a/1.png"]["data"] == imgs[1]
    assert rows[f"{shard1}#0"]["data"] == imgs[2] and rows[f"{shard1}#1"]["data"] == imgs[3]
    assert "no image column" in rows[f"{shard2}#"]["error"]
