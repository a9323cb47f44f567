"""Image intake shared by the batch pipelines and the Serve apps.

`decode_image(data)` turns the bytes of one file into an RGB `PIL.Image`:
the format is checked, the byte and pixel limits are enforced *before* any
pixel is decoded (decompression bombs are refused from the header alone), EXIF
orientation is applied and every mode is converted to RGB. Anything wrong
raises `ImageError`, whose `kind` is a short machine-readable label and whose
message says what was wrong with the file. Resizing and normalisation are not
done here: they belong to each encoder's preprocessing.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's own bomb check raises at 2x MAX_IMAGE_PIXELS; ours runs first with a
# configurable limit, so keep Pillow's as a backstop only.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"}
)
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000  # about 7071 x 7071


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to every image before it is decoded."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


class ImageError(ValueError):
    """A file that cannot be used as an image; `kind` labels the cause."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def image_id(source: str) -> str:
    """Stable identifier of an image: a 128-bit hex digest of its source path or URI."""
    return hashlib.blake2b(source.encode("utf-8"), digest_size=16).hexdigest()


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode `data` into an RGB image with EXIF orientation applied, or raise ImageError."""
    if not data:
        raise ImageError("empty", "empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(
            "too_large", f"file is {len(data):,} bytes, over the limit of {limits.max_bytes:,} bytes"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", f"refused before decoding: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not a recognised image file (unknown format)") from None
    except Exception as e:  # Pillow raises a zoo of errors on malformed headers
        raise ImageError("corrupt", f"cannot read the image header: {e}") from None

    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(
            "unsupported_format",
            f"format {img.format} is not supported (use one of {', '.join(sorted(SUPPORTED_FORMATS))})",
        )
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"invalid image size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageError(
            "decompression_bomb",
            f"{width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,}; refused before decoding",
        )
    try:
        img.load()  # the first frame of animated GIF/WebP/TIFF
    except Exception as e:
        raise ImageError("corrupt", f"corrupt or truncated {img.format} data: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a broken EXIF block is no reason to lose a decodable image
    try:
        return to_rgb(img)
    except Exception as e:
        raise ImageError("corrupt", f"cannot convert mode {img.mode} to RGB: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")  # applies the palette's transparency
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16/32-bit integer or float single-channel image to 8 bits."""
    arr = np.nan_to_num(arr.astype(np.float64))
    if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
        arr = arr / 257.0  # the 16-bit range onto 8 bits
    elif mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0  # float images in [0, 1]
    return np.clip(arr, 0, 255).astype(np.uint8)
