"""`pixelray show`: a caption store as one self-contained HTML page (thumbnails inline, no JavaScript), filtered
and sampled, with its error rows; seen in a headless browser where one is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixelray.pipelines.caption import CaptionConfig, run_caption
from pixelray.pipelines.show import show_store

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "images"


@pytest.fixture(scope="module")
def store(ray_address, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    for path in sorted(IMAGES.glob("*.png")):
        shutil.copyfile(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path_factory.mktemp("caps") / "store"
    run_caption(CaptionConfig(input=str(folder), out=str(out), address=ray_address))
    return out


def figures(page: str) -> list[str]:
    return re.findall(r"<figure>.*?</figure>", page, flags=re.S)


def test_a_page_of_captions_and_errors(store, tmp_path):
    captions = {Path(r["path"]).name: r["caption"] for r in pq.read_table(store / "captions").to_pylist()}
    page_path = tmp_path / "page.html"
    result = show_store(str(store), str(page_path))
    page = page_path.read_text()
    assert (result.shown, result.matching, result.errors) == (len(captions), len(captions), 1)
    cards = figures(page)
    assert len(cards) == len(captions) and all('src="data:image/jpeg;base64,' in c for c in cards)
    for name, caption in captions.items():
        assert any(name in c and caption in c for c in cards), name
    assert "broken.png" in page and "<script" not in page and "last run:" in page

    red = {n for n, c in captions.items() if "red star" in c}
    result = show_store(str(store), str(page_path), where=["caption~red star"])
    assert result.matching == len(red) > 0 and {n for n in red if n in page_path.read_text()} == red
    sampled = show_store(str(store), str(page_path), limit=5, where=["finish_reason=stop"])
    assert (sampled.shown, sampled.matching) == (5, len(captions))
    assert figures(page_path.read_text()) and len(figures(page_path.read_text())) == 5
    with pytest.raises(ValueError, match="COLUMN=VALUE"):
        show_store(str(store), str(page_path), where=["colour=red"])


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no headless chromium here")
def test_the_page_renders_in_a_headless_browser(store, tmp_path):
    show_store(str(store), str(tmp_path / "page.html"))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,900", (tmp_path / "page.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # images drawn
