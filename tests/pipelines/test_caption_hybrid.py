"""`pixelray caption` with a hybrid model: against pixelray's own /v1, against `mlx_vlm.server`, and
with the LLM server killed mid-job."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixelray.errors import TRANSIENT
from pixelray.hybrid import HybridPixelLLM
from pixelray.pipelines.caption import CaptionConfig, run_caption
from pixelray.testing import free_port
from pixelray.testing.images import bad_files, random_images, write_folder
from pixelray.testing.llm_servers import FailingLLM
from pixelray.testing.tiny_mlx import mlx_vlm_server, save_in_subprocess


@pytest.fixture(scope="module")
def llm_v1(serve_url, tiny_text_llm):
    """pixelray's own /v1 on 127.0.0.1 serving the tiny text LLM as `tiny-llm`: the hybrid's LLM server."""
    from ray import serve

    from pixelray.serve_apps.vlm import build_app

    serve.run(build_app({"models": [{"name": "tiny-llm", "source": str(tiny_text_llm), "device": "cpu",
                                     "num_cpus": 0.1, "max_new_tokens": 16}]}), name="llm", route_prefix="/")
    yield f"{serve_url}/v1"
    serve.delete("llm")


def test_caption_job_with_the_hybrid(llm_v1, tiny_clip, tmp_path):
    images = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "images"
    result = run_caption(CaptionConfig(input=str(images), out=str(tmp_path / "ok"),
                                       model=f"hybrid:{tiny_clip}?url={llm_v1}&model=tiny-llm&max_retries=1",
                                       generation={"max_new_tokens": 8}, batch_size=4))
    rows = sorted(pq.read_table(tmp_path / "ok" / "captions").to_pylist(), key=lambda r: r["path"])
    count = len(list(images.glob("*.png")))
    assert (result.written, result.errors, len(rows)) == (count, 0, count)
    # the same captions as the library gives, image by image
    hybrid = HybridPixelLLM({"encoder": str(tiny_clip), "device": "cpu",
                             "llm": {"base_url": llm_v1, "model": "tiny-llm", "temperature": 0,
                                     "max_tokens": 8}})
    expected = hybrid.generate_batch([Image.open(r["path"]).convert("RGB") for r in rows])
    assert [r["caption"] for r in rows] == expected

    down = f"hybrid:{tiny_clip}?url=http://127.0.0.1:{free_port()}/v1&model=m&max_retries=1"
    result = run_caption(CaptionConfig(input=str(images), out=str(tmp_path / "down"), model=down, batch_size=4))
    errors = pq.read_table(tmp_path / "down" / "errors").to_pylist()
    assert (result.written, result.errors, len(errors)) == (0, count, count)
    assert all(e["error_type"] == TRANSIENT and "cannot be reached" in e["error"] for e in errors)


def test_resume_retries_what_an_llm_outage_failed(ray_address, tiny_clip, tmp_path):
    """With the LLM server down, every image is a `transient` error row; once a server answers at that
    address again, --resume captions exactly those (a corrupt image's row stays: it is no passing
    failure), and no id is ever in the store twice."""
    folder = tmp_path / "imgs"
    write_folder(folder, 5, bad=False)
    (folder / "truncated.jpg").write_bytes(bad_files()["truncated.jpg"][0])
    port = free_port()
    settings = dict(input=str(folder), out=str(tmp_path / "out"), batch_size=3, generation={"max_new_tokens": 8},
                    model=f"hybrid:{tiny_clip}?url=http://127.0.0.1:{port}/v1&model=m&max_retries=1"
                          "&max_retry_wait=0.1")
    down = run_caption(CaptionConfig(**settings))
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert (down.written, down.errors, len(errors)) == (0, 6, 6)
    kinds = {Path(e["path"]).name: e["error_type"] for e in errors}
    assert kinds.pop("truncated.jpg") == "corrupt" and set(kinds.values()) == {TRANSIENT}, kinds
    assert all("cannot be reached" in e["error"] for e in errors if e["error_type"] == TRANSIENT)

    server = FailingLLM("ok", port=port)  # the server is back, where it was
    try:
        again = run_caption(CaptionConfig(**settings, resume=True))
    finally:
        server.shutdown()
    assert (again.written, again.errors, again.previously_stored, server.requests) == (5, 0, 1, 5)
    captions = pq.read_table(tmp_path / "out" / "captions").to_pylist()
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert sorted(c["caption"] for c in captions) == [f"caption {i}" for i in range(1, 6)]
    assert [(Path(e["path"]).name, e["error_type"]) for e in errors] == [("truncated.jpg", "corrupt")]
    ids = [r["image_id"] for r in captions + errors]
    assert len(ids) == len(set(ids)) == 6


# --- against mlx_vlm.server, and a server stopped mid-batch ----------------------------------------


@pytest.mark.slow
def test_mlx_vlm_server_and_a_server_killed_mid_batch(ray_address, tiny_clip, tmp_path):
    """The hybrid's LLM is `python -m mlx_vlm.server` (mlx-vlm's CPU build) serving a tiny local
    Qwen2-VL; then a caption job runs against it and the server is killed after a few answers: the
    answered images keep their captions, the rest become error rows, and the job ends normally."""
    import pyarrow.parquet as pq

    from pixelray.pipelines.caption import CaptionConfig, run_caption

    model = save_in_subprocess(tmp_path / "mlx-model")
    port = free_port()
    log = tmp_path / "mlx-server.log"
    with mlx_vlm_server(model, log, port) as (proc, url):
        hybrid = HybridPixelLLM({"encoder": str(tiny_clip), "device": "cpu",
                                 "llm": {"base_url": url, "temperature": 0, "max_tokens": 8}})
        assert hybrid.client.model() == str(model)  # no model named: the one the server lists
        captions = hybrid.generate_batch(random_images(3))
        assert all(isinstance(c, str) for c in captions), captions
        hybrid.close()

        folder = tmp_path / "imgs"
        write_folder(folder, 24, bad=False)
        source = f"hybrid:{tiny_clip}?url={url}&max_concurrency=1&max_retries=1&timeout=20"
        killed = threading.Event()

        def kill_after_three_answers():  # the job runs in this test's thread; this one only watches the log
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and log.read_text().count("POST /v1/chat/completions") < 3 + 3:
                time.sleep(0.05)  # (3 requests came from generate_batch above)
            os.killpg(proc.pid, signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_after_three_answers, daemon=True).start()
        # one generator actor: the Serve app of the tests above still holds some of the 2 CPUs
        result = run_caption(CaptionConfig(input=str(folder), out=str(tmp_path / "out"), model=source,
                                           generation={"max_new_tokens": 48}, batch_size=4, num_generators=1))
        assert killed.wait(timeout=5), "the job ended before the server was killed"
        proc.wait(timeout=30)
        rows = pq.read_table(tmp_path / "out" / "captions").num_rows
        errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
        # the third answer may be cut off by the kill (the server logs a request as its answer starts)
        assert rows >= 2 and errors and rows + len(errors) == 24
        assert (result.written, result.errors) == (rows, len(errors))
        assert all("cannot be reached" in e["error"] for e in errors), errors[0]
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

