"""An input that kills its worker (a segfault, an out-of-memory kill) costs only itself: Ray's retries of
the block are bounded, the block's other images are done again one by one, and the culprit becomes an
error row (`worker_crashed`); in a shard, where items cannot be split off, the job stops with a clear
error instead of retrying forever. The killer is a real encoder, registered with transformers by a
worker setup hook (see poison_encoder_job.py), whose forward ends its process on an all-magenta image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixelray.testing.images import write_folder

DRIVER = Path(__file__).with_name("poison_encoder_job.py")


@pytest.mark.slow
def test_a_poison_image_is_an_error_row_and_a_poison_shard_stops_the_job(ray_address, tmp_path):
    folder = tmp_path / "imgs"
    good = [str(p) for p in write_folder(folder, 11, bad=False)["good"]]
    Image.new("RGB", (48, 40), (255, 0, 255)).save(folder / "poison.png")
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:  # the same images, in a WebDataset shard
        for path in sorted(folder.glob("*.*")):
            if path.suffix != ".md":
                tar.add(path, arcname=path.name)
    shards = tmp_path / "shards"
    shards.mkdir()
    (tmp_path / "shard-0.tar").rename(shards / "shard-0.tar")

    proc = subprocess.run([sys.executable, str(DRIVER), ray_address, str(tmp_path / "model"), str(folder),
                           str(tmp_path / "out"), str(shards), str(tmp_path / "out-shards")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    # (the job's JSON lines, among the raylet's notes of dead workers)
    files, shard = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"'))

    # files: the 11 good images embedded once each; the poison one an error row; the job ended
    assert (files["written"], files["errors"]) == (11, 1), files
    features = pq.read_table(tmp_path / "out" / "features")
    assert sorted(features["path"].to_pylist()) == sorted(good)
    assert features.num_rows == len(set(features["image_id"].to_pylist())) == 11
    [crashed] = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert (Path(crashed["path"]).name, crashed["error_type"]) == ("poison.png", "worker_crashed")
    assert "its worker crashed, was killed for memory" in crashed["error"]

    # a shard: its block is tried twice (max_task_retries=1), then the job stops, saying why
    assert shard["code"] == "workers_died" and "each tried 2 times" in shard["error"], shard
    assert "--resume goes on from it" in shard["error"]
