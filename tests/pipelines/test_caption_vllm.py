"""`pixelray caption --model vllm:...` end to end (vLLM's CPU build): the same captions as the hf backend,
a bad file and an image the engine refuses as error rows, and a driver killed mid-job then resumed,
each image exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pixelray.generators import GenerationConfig, create_generator
from pixelray.images import decode_image
from pixelray.pipelines.caption import CaptionConfig, run_caption
from pixelray.testing.images import random_rgb, write_folder
from pixelray.testing.processes import kill_session

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

PIXELRAY = str(Path(sys.executable).parent / "pixelray")
# at this processor setting a 448x448 image is 256 tokens, more than the context holds: the engine refuses it
SETTINGS = "max_model_len=256&mm.max_pixels=200704&kv_cache_gib=0.25"


def test_caption_job_killed_and_resumed(ray_address, tiny_qwen2_vl_h128, tmp_path):
    info = write_folder(tmp_path / "imgs", n_good=40)
    random_rgb(448, 448, seed=99).save(tmp_path / "imgs" / "too_many_tokens.png")
    out = tmp_path / "captions"
    model = f"vllm:{tiny_qwen2_vl_h128}?{SETTINGS}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the job starts a Ray of its own
    proc = subprocess.Popen([PIXELRAY, "caption", str(tmp_path / "imgs"), "--out", str(out), "--model", model,
                             "--dtype", "fp32", "--max-tokens", "48", "--batch-size", "2", "--rows-per-file", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(list(out.glob("captions/*.parquet"))) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        kill_session(proc)
    at_kill = pq.read_table(out / "captions").num_rows
    assert 2 <= at_kill < 40

    cfg = CaptionConfig(input=str(tmp_path / "imgs"), out=str(out), model=model, dtype="fp32",
                        generation={"max_new_tokens": 48}, batch_size=2, rows_per_file=2, resume=True)
    res = run_caption(cfg)
    assert res.previously_stored >= at_kill
    rows = pq.read_table(out / "captions").to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in info["good"])  # each exactly once
    errors = {Path(e["path"]).name: e for e in pq.read_table(out / "errors").to_pylist()}
    assert errors.keys() == {*info["errors"], "too_many_tokens.png"}  # each exactly once
    refused = errors["too_many_tokens.png"]
    assert refused["error_type"] == "generation" and "longer than the maximum model length" in refused["error"]

    hf = create_generator(f"hf:{tiny_qwen2_vl_h128}", device="cpu", dtype="fp32")
    expected = hf.generate([decode_image(Path(r["path"]).read_bytes()) for r in rows], "Describe the image.",
                           GenerationConfig(max_new_tokens=48))
    assert [(r["caption"], r["num_tokens"], r["finish_reason"]) for r in rows] == [
        (e.text, e.num_tokens, e.finish_reason) for e in expected]
    assert {r["model"] for r in rows} == {model}
