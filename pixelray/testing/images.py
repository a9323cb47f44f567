"""Image files written by the tests and benchmarks themselves: good ones, every bad kind the intake
refuses, and folders of realistic JPEGs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def random_rgb(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    """`n` random RGB images of different heights."""
    return [random_rgb(48, 40 + 4 * i, seed=seed + i) for i in range(n)]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A valid PNG header claiming `width` x `height` with a tiny IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\0" * 64) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected error kind) for every bad-image class the intake refuses."""
    jpeg = encode(random_rgb(64, 64), "JPEG")
    return {
        "empty.jpg": (b"", "empty"),
        "text.jpg": (b"this is not an image\n" * 10, "not_an_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "garbage_after_magic.png": (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not_an_image"),
        "bad_pixel_data.png": (png_header_only(16, 16, idat=b"definitely not zlib"), "corrupt"),
        "bomb.png": (png_header_only(10_000, 10_000), "decompression_bomb"),
        "huge_bomb.png": (png_header_only(100_000, 100_000), "decompression_bomb"),
        "portable.ppm": (encode(random_rgb(), "PPM"), "unsupported_format"),
    }


def write_folder(root: Path, n_good: int = 6, bad: bool = True, size: tuple[int, int] = (48, 40)) -> dict:
    """A folder of good JPEG/PNG images plus, optionally, every bad class; returns what it wrote."""
    root.mkdir(parents=True, exist_ok=True)
    good = []
    for i in range(n_good):
        ext = ("jpg", "png", "webp")[i % 3]
        path = root / f"img_{i:04d}.{ext}"
        random_rgb(*size, seed=i).save(path)
        good.append(path)
    errors = {}
    if bad:
        for name, (data, kind) in bad_files().items():
            (root / name).write_bytes(data)
            errors[name] = kind
        errors.pop("portable.ppm")  # folders list images by extension; .ppm is not picked up
        (root / "portable.ppm").unlink()
    (root / "notes.md").write_text("not an image, ignored when listing a folder")
    return {"good": good, "errors": errors}


def make_images(folder: Path, n: int, size: int = 224) -> list[Path]:
    """Smooth gradients with a little noise and a shape: JPEGs of realistic size (~10-20 KB)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        base = np.stack([xx * rng.uniform(50, 255), yy * rng.uniform(50, 255),
                         (xx + yy) / 2 * rng.uniform(50, 255)], -1)
        base += rng.normal(0, 6, base.shape)
        x0, y0 = rng.integers(20, size - 80, 2)
        base[y0:y0 + 60, x0:x0 + 60] = rng.uniform(0, 255, 3)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths
