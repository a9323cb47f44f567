"""Hostile inputs and stores (issue 17, batch): a device, a FIFO or a folder where an image should be, a
sparse 1 GiB tar member, ids that collide, two jobs on one store, and a store a crash left unreadable."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pixelray.encoders import resolve_encoder
from pixelray.images import ImageError, image_id, open_image
from pixelray.pipelines.caption import CaptionConfig, run_caption
from pixelray.pipelines.embed import EmbedConfig, run_embed
from pixelray.lock import LOCK_FILE, STALE_S, StoreLock, StoreLockedError
from pixelray.pipelines.sources import read_images, read_shards, resolve_input
from pixelray.store import Store, write_parquet_atomic
from pixelray.testing.images import encode, random_rgb, write_folder

PIXELRAY = str(Path(sys.executable).parent / "pixelray")
NO_IDS = np.array([], dtype="S32")
GiB = 1 << 30


def _rows(out: Path, table: str) -> list[dict]:
    return pq.read_table(out / table).to_pylist() if any((out / table).glob("*.parquet")) else []


def _unique_ids(out: Path, table: str = "features", key: str = "image_id") -> list[str]:
    """Every key of the table and errors/: never two rows under one id."""
    ids = [r[key] for r in _rows(out, table) + _rows(out, "errors")]
    assert len(ids) == len(set(ids)), sorted(ids)
    return ids


def _sparse_file(path: Path, size: int = GiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: no disk, no memory, size bytes long
    return path


# --- 1. what is not a regular file, and what is too large, is never read --------------------------


@pytest.mark.slow
def test_devices_fifos_folders_and_oversize_files_are_error_rows_never_read(ray_address, tiny_dinov2, tmp_path):
    good = tmp_path / "good.png"
    random_rgb(seed=1).save(good)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it would block the reader for ever
    (tmp_path / "folder.jpg").mkdir()
    big = _sparse_file(tmp_path / "big.jpg")  # 1 GiB: refused from its size, never read
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(["/dev/zero", str(fifo), "folder.jpg", "big.jpg", str(good), "gone.jpg"]))
    began = time.perf_counter()
    proc = subprocess.run([PIXELRAY, "embed", str(lst), "--out", str(tmp_path / "s"), "--encoder", str(tiny_dinov2),
                           "--address", ray_address], capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - began
    print(f"list with /dev/zero, a FIFO, a folder and a sparse 1 GiB file: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 images embedded, 5 errors" in proc.stdout
    assert [r["path"] for r in _rows(tmp_path / "s", "features")] == [str(good)]
    errors = {r["path"]: r for r in _rows(tmp_path / "s", "errors")}
    assert {p: r["error_type"] for p, r in errors.items()} == {
        "/dev/zero": "not_a_file", str(fifo): "not_a_file", str(tmp_path / "folder.jpg"): "not_a_file",
        str(big): "too_large", str(tmp_path / "gone.jpg"): "unreadable"}
    assert "character device" in errors["/dev/zero"]["error"] and "FIFO" in errors[str(fifo)]["error"]
    assert f"{GiB:,} bytes" in errors[str(big)]["error"]
    _unique_ids(tmp_path / "s")


def test_a_fifo_in_a_folder_is_an_error_row_and_open_image_never_blocks(ray_address, tmp_path):
    write_folder(tmp_path / "imgs", n_good=2, bad=False)
    os.mkfifo(tmp_path / "imgs" / "pipe.png")
    rows = {Path(r["path"]).name: r for r in read_images(resolve_input(str(tmp_path / "imgs")), NO_IDS).take_all()}
    assert rows["pipe.png"]["error_type"] == "not_a_file" and len(rows) == 3  # listed, not silently skipped

    outcome = {}

    def open_it(path):
        try:
            open_image(path)
        except ImageError as e:
            outcome[path] = e.code

    for path in (str(tmp_path / "imgs" / "pipe.png"), "/dev/zero", str(_sparse_file(tmp_path / "big.png"))):
        t = threading.Thread(target=open_it, args=(path,), daemon=True)  # a hang fails here, not for ever
        t.start()
        t.join(10)
        assert not t.is_alive(), f"open_image({path}) blocked"
    assert list(outcome.values()) == ["not_a_file", "not_a_file", "too_large"]
    with pytest.raises(ValueError, match="not a regular file"):
        resolve_input(str(tmp_path / "imgs" / "pipe.png"))


def _sparse_tar(path: Path, how: str) -> Path:
    """A tar shard of a few KB: a sparse 1 GiB member big.png, two images, a second member named 0.jpg
    and a symbolic link named link.jpg. `how`: made by GNU tar --sparse, or as a PAX 1.0 sparse member."""
    members = [("0.jpg", encode(random_rgb(seed=0), "JPEG")), ("1.jpg", encode(random_rgb(seed=1), "JPEG")),
               ("0.jpg", encode(random_rgb(seed=2), "JPEG"))]
    if how == "gnu":
        if shutil.which("tar") is None:
            pytest.skip("GNU tar is not installed")
        src = path.parent.parent / f"{path.stem}-sparse-src"  # not beside the shard: it would be listed
        src.mkdir()
        _sparse_file(src / "big.png")
        subprocess.run(["tar", "--sparse", "-cf", str(path), "-C", str(src), "big.png"], check=True)
    with tarfile.open(path, "a" if how == "gnu" else "w", format=tarfile.PAX_FORMAT) as tar:
        if how == "pax":
            big = tarfile.TarInfo("big.png")
            big.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "big.png",
                               "GNU.sparse.realsize": str(GiB)}
            stored = b"1\n%d\n512\n" % (GiB - 512)  # the sparse map: one block of data at the very end
            stored = stored.ljust(512, b"\0") + b"\0" * 512
            big.size = len(stored)
            tar.addfile(big, io.BytesIO(stored))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "0.jpg"
        tar.addfile(link)
    assert path.stat().st_size < 64 * 1024
    return path


@pytest.mark.parametrize("how", ["gnu", "pax"])
def test_a_sparse_1gib_tar_member_is_refused_from_its_header(tmp_path, how):
    shard = str(_sparse_tar(tmp_path / "0.tar", how))
    tracemalloc.start()
    try:
        batches = list(read_shards({"path": np.array([shard])}, pafs.LocalFileSystem(), "tar", NO_IDS))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"{how} tar with a sparse 1 GiB member: peak Python memory {peak / 1024:.0f} KiB while reading")
    assert peak < 32 * 2**20
    rows = [dict(zip(b, vals)) for b in batches for vals in zip(*b.values())]
    got = {r["path"][len(shard) + 1:]: r["error_type"] for r in rows}
    assert got == {"big.png": "too_large", "0.jpg": "", "1.jpg": "", "0.jpg#2": "duplicate",
                   "link.jpg": "not_a_file"}  # the stream went on past the refused member
    assert len({r["image_id"] for r in rows}) == len(rows)
    first = next(r for r in rows if r["path"].endswith("#0.jpg"))
    assert first["data"] == encode(random_rgb(seed=0), "JPEG")  # the first copy is the one read


def test_sparse_tar_through_a_job(ray_address, tiny_dinov2, tmp_path):
    (tmp_path / "shards").mkdir()
    shard = _sparse_tar(tmp_path / "shards" / "0.tar", "gnu" if shutil.which("tar") else "pax")
    res = run_embed(EmbedConfig(input=str(tmp_path / "shards"), out=str(tmp_path / "s"), encoder=str(tiny_dinov2)))
    assert (res.written, res.errors) == (2, 3)
    errors = {r["path"]: r["error_type"] for r in _rows(tmp_path / "s", "errors")}
    assert errors == {f"{shard}#big.png": "too_large", f"{shard}#0.jpg#2": "duplicate",
                      f"{shard}#link.jpg": "not_a_file"}
    _unique_ids(tmp_path / "s")


# --- 3. ids never collide ---------------------------------------------------------------------------


def test_a_line_twice_in_a_list_file_is_read_once(ray_address, tiny_dinov2, tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=2, bad=False)
    a, b = (str(p) for p in info["good"])
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([a, b, a, f"imgs/{Path(a).name}"]))  # the third and fourth name `a` again
    res = run_embed(EmbedConfig(input=str(lst), out=str(tmp_path / "s"), encoder=str(tiny_dinov2)))
    assert (res.written, res.errors) == (2, 2)
    assert sorted(r["path"] for r in _rows(tmp_path / "s", "features")) == sorted([a, b])
    errors = {r["path"]: r for r in _rows(tmp_path / "s", "errors")}
    assert {p: r["error_type"] for p, r in errors.items()} == {f"{a}#2": "duplicate", f"{a}#3": "duplicate"}
    assert "entry 3, first at entry 1" in errors[f"{a}#2"]["error"]
    assert all(r["image_id"] == image_id(r["path"]) for r in _rows(tmp_path / "s", "errors"))
    _unique_ids(tmp_path / "s")
    again = run_embed(EmbedConfig(input=str(lst), out=str(tmp_path / "s"), encoder=str(tiny_dinov2), resume=True))
    assert (again.written, again.errors, again.previously_stored) == (0, 0, 4)


def test_null_and_repeated_parquet_keys_get_distinct_ids(ray_address, tiny_dinov2, tmp_path):
    (tmp_path / "pq").mkdir()
    imgs = [encode(random_rgb(seed=i), "PNG") for i in range(5)]
    keys = ["a", None, "a", "", None]
    pq.write_table(pa.table({"image": imgs + [b"x" * 60_000], "key": keys + ["big"]}), tmp_path / "pq/0.parquet")
    shard = f"{tmp_path}/pq/0.parquet"
    res = run_embed(EmbedConfig(input=str(tmp_path / "pq"), out=str(tmp_path / "s"), encoder=str(tiny_dinov2),
                                max_image_bytes=50_000))
    assert (res.written, res.errors) == (4, 2)
    assert sorted(r["path"] for r in _rows(tmp_path / "s", "features")) == sorted(
        f"{shard}#{k}" for k in ("a", "row:1", "row:3", "row:4"))
    errors = {r["path"]: r["error_type"] for r in _rows(tmp_path / "s", "errors")}
    assert errors == {f"{shard}#a#2": "duplicate", f"{shard}#big": "too_large"}
    _unique_ids(tmp_path / "s")


def test_a_question_asked_twice_of_one_image_is_answered_once(ray_address, tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=1, bad=False)
    name = info["good"][0].name
    rows = [{"image": f"imgs/{name}", "question": "What shape is it?"},
            {"image": f"imgs/{name}", "question": "What colour is it?"},
            {"image": str(info["good"][0]), "question": "What shape is it?"}]  # the first row again
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("\n".join(json.dumps(r) for r in rows))
    res = run_caption(CaptionConfig(questions=str(qfile), out=str(tmp_path / "v"), generation={"max_new_tokens": 3}))
    assert (res.written, res.errors) == (2, 1)
    err = _rows(tmp_path / "v", "errors")[0]
    assert err["error_type"] == "duplicate" and err["question"] == "What shape is it?"
    _unique_ids(tmp_path / "v", "captions", key="item_id")


# --- 2. one job at a time per store -----------------------------------------------------------------


def _holder(out: Path) -> dict:
    try:
        return json.loads((out / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_a_second_job_on_a_store_is_refused_while_the_first_runs(ray_address, tiny_dinov2, tmp_path):
    write_folder(tmp_path / "imgs", n_good=12, bad=False)
    out = tmp_path / "s"
    cfg = EmbedConfig(input=str(tmp_path / "imgs"), out=str(out), encoder=str(tiny_dinov2), batch_size=2)
    first = subprocess.Popen([PIXELRAY, "embed", str(tmp_path / "imgs"), "--out", str(out), "--encoder",
                              str(tiny_dinov2), "--batch-size", "2", "--address", ray_address],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while _holder(out).get("pid") != first.pid and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert _holder(out).get("pid") == first.pid, "the first job never took the lock"
        for resume in (False, True):
            with pytest.raises(StoreLockedError) as refused:
                run_embed(cfg.model_copy(update={"resume": resume}))
            message = str(refused.value)
            assert f"pid {first.pid} on {socket.gethostname()}" in message and "\n" not in message
        stdout, stderr = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert "12 images embedded, 0 errors" in stdout  # the refused jobs took nothing from it
    assert not (out / LOCK_FILE).exists()  # released at the job's end
    again = run_embed(cfg.model_copy(update={"resume": True}))
    assert (again.written, again.previously_stored) == (0, 12)
    assert len(_unique_ids(out)) == 12


def test_the_lock_of_a_killed_job_does_not_block(ray_address, tiny_dinov2, tmp_path):
    write_folder(tmp_path / "imgs", n_good=3, bad=False)
    out = tmp_path / "s"
    cfg = EmbedConfig(input=str(tmp_path / "imgs"), out=str(out), encoder=str(tiny_dinov2))
    manifest = cfg.manifest(resolve_encoder(cfg.encoder))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import json, sys, time\nfrom pixelray.store import Store\n"
         "store = Store(sys.argv[1], 'features')\n"
         "store.prepare(json.loads(sys.argv[2]), resume=False, overwrite=False)\n"
         "print('locked', flush=True)\ntime.sleep(600)", str(out), json.dumps(manifest)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid} "):
            run_embed(cfg.model_copy(update={"resume": True}))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _holder(out)["pid"] == holder.pid  # a lock file left behind by a dead process
    res = run_embed(cfg.model_copy(update={"resume": True}))
    assert res.written == 3 and not (out / LOCK_FILE).exists()


def test_object_store_lock_refuses_a_fresh_lock_and_takes_over_a_stale_one(tmp_path):
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file")))  # not local: the lock-file protocol
    root, path = str(tmp_path), tmp_path / LOCK_FILE
    first = StoreLock(fs, root, "s3://bucket/store")
    first.acquire()
    assert _holder(tmp_path)["pid"] == os.getpid()
    with pytest.raises(StoreLockedError, match=f"s3://bucket/store is in use .*pid {os.getpid()} on "):
        StoreLock(fs, root, "s3://bucket/store").acquire()
    first.release()
    assert not path.exists()

    dead = subprocess.Popen(["true"])
    dead.wait()
    for left in ({"host": socket.gethostname(), "pid": dead.pid, "refreshed": time.time()},  # dead on this host
                 {"host": "elsewhere", "pid": 1, "refreshed": time.time() - STALE_S - 1}):  # not refreshed
        path.write_text(json.dumps(left))
        lock = StoreLock(fs, root, "s3://bucket/store")
        lock.acquire()
        assert _holder(tmp_path)["token"] == lock.token
        lock.release()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "refreshed": time.time(), "since": "then"}))
    with pytest.raises(StoreLockedError, match="pid 1 on elsewhere, since then"):
        StoreLock(fs, root, "s3://bucket/store").acquire()


# --- 4. atomic, durable writes; an unreadable file does not block a resume ---------------------------


def test_files_and_manifest_are_fsynced_then_renamed(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    write_parquet_atomic(pa.table({"image_id": ["a"]}), pafs.LocalFileSystem(), f"{tmp_path}/x.parquet")
    assert synced[0].startswith(f"{tmp_path}/.x.parquet.") and synced[1] == str(tmp_path)  # data, then the folder
    synced.clear()
    with Store(str(tmp_path / "s"), "features") as store:
        store.prepare({"job": "embed"}, resume=False, overwrite=False)
    assert any(p.startswith(f"{tmp_path}/s/.pixelray.json.") for p in synced)
    assert json.loads((tmp_path / "s/pixelray.json").read_text()) == {"job": "embed"}
    assert [p.name for p in tmp_path.rglob(".*.tmp")] == []


def test_resume_moves_an_unreadable_file_aside_and_redoes_its_items(ray_address, tiny_dinov2, tmp_path, caplog):
    info = write_folder(tmp_path / "imgs", n_good=6, bad=False)
    out = tmp_path / "s"
    cfg = EmbedConfig(input=str(tmp_path / "imgs"), out=str(out), encoder=str(tiny_dinov2), batch_size=2,
                      rows_per_file=2)
    run_embed(cfg)
    victim = sorted((out / "features").glob("*.parquet"))[0]
    lost = pq.read_table(victim).num_rows
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a crash's half-written file

    res = run_embed(cfg.model_copy(update={"resume": True}))
    assert (res.written, res.previously_stored) == (lost, 6 - lost)
    moved = out / "quarantine" / "features" / victim.name
    assert res.store.quarantined == [(str(victim), str(moved))] and moved.exists() and not victim.exists()
    assert str(victim) in caplog.text and str(victim) in str(res)
    assert sorted(r["path"] for r in _rows(out, "features")) == sorted(str(p) for p in info["good"])
    assert len(_unique_ids(out)) == 6
