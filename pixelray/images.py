"""Image intake shared by the batch pipelines and the Serve apps.

`decode_image(data)` turns the bytes of one file into an RGB `PIL.Image`:
the format is checked, the byte and pixel limits are enforced *before* any
pixel is decoded (decompression bombs are refused from the header alone), EXIF
orientation is applied and every mode is converted to RGB. Anything wrong
raises `ImageError`, whose `code` is a short machine-readable label (a batch
job's `error_type`) and whose message says what was wrong with the file.
Resizing and normalisation belong to each model's preprocessing; `ImageFit` only scales an image
down to what that preprocessing uses of it, so that nothing holds more pixels than a model needs.
`open_image(path_or_uri)` reads a file and decodes it the same way.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pixelray.errors import PixelrayError

# Pillow's own bomb check raises at 2x MAX_IMAGE_PIXELS; ours runs first with a
# configurable limit, so keep Pillow's as a backstop only.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"}
)
MiB = 1024 * 1024


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to every image before it is decoded."""

    max_bytes: int = 32 * MiB
    max_pixels: int = 50_000_000  # about 7071 x 7071


@dataclass(frozen=True)
class ImageFit:
    """How far an image can be scaled down before the model's own preprocessing sees less of it: its
    shorter side to `short_side`, its longer side to `long_side`, its area to `pixels` (None: no bound)."""

    short_side: int | None = None
    long_side: int | None = None
    pixels: int | None = None

    @classmethod
    def encoder_input(cls, side: int) -> "ImageFit":
        """For an encoder whose input is `side` px: the short side to twice that, enough margin that the
        encoder's own resize (and crop) gives the same pixels within resampling noise. `pixelray embed` and
        the Serve encoders both scale so, so that an image's vector is the same in a store and over HTTP."""
        return cls(short_side=2 * side)

    def scale(self, width: int, height: int) -> float:
        bounds = [(self.short_side, min(width, height)), (self.long_side, max(width, height)),
                  (self.pixels ** 0.5 if self.pixels else None, (width * height) ** 0.5)]
        return min([1.0] + [limit / size for limit, size in bounds if limit and size > limit])

    def apply(self, image: Image.Image) -> Image.Image:
        """The image scaled down (aspect kept) to what the model uses of it; as it is when already small."""
        scale = self.scale(*image.size)
        if scale >= 1.0:
            return image
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


FILE_LIMITS = ImageLimits()  # batch jobs: image files and shard members
# the Serve app: one uploaded image, within a request body of at most 25 MiB
UPLOAD_LIMITS = ImageLimits(max_bytes=20 * MiB)
MAX_REQUEST_BYTES = 25 * MiB


class ImageError(PixelrayError):
    """A file that cannot be used as an image; `code` labels the cause (empty, too_large, corrupt, ...)."""


def image_id(source: str) -> str:
    """Stable identifier of an image: a 128-bit hex digest of its source path or URI."""
    return hashlib.blake2b(source.encode("utf-8"), digest_size=16).hexdigest()


def decode_image(data: bytes, limits: ImageLimits = FILE_LIMITS) -> Image.Image:
    """Decode `data` into an RGB image with EXIF orientation applied, or raise ImageError."""
    if not data:
        raise ImageError("empty file (0 bytes)", code="empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"file is {len(data):,} bytes, over the limit of {limits.max_bytes:,} bytes",
                         status=413, code="too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"refused before decoding: {e}", code="decompression_bomb") from None
    except UnidentifiedImageError:
        raise ImageError("not a recognised image file (unknown format)", code="not_an_image") from None
    except Exception as e:  # Pillow raises a zoo of errors on malformed headers
        raise ImageError(f"cannot read the image header: {e}", code="corrupt") from None

    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(f"format {img.format} is not supported (use one of {', '.join(sorted(SUPPORTED_FORMATS))})",
                         code="unsupported_format")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"invalid image size {width}x{height}", code="corrupt")
    if width * height > limits.max_pixels:
        raise ImageError(f"{width}x{height} = {width * height:,} pixels, over the limit of {limits.max_pixels:,}; "
                         "refused before decoding", code="decompression_bomb")
    try:
        img.load()  # the first frame of animated GIF/WebP/TIFF
    except Exception as e:
        raise ImageError(f"corrupt or truncated {img.format} data: {e}", code="corrupt") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a broken EXIF block is no reason to lose a decodable image
    try:
        return to_rgb(img)
    except Exception as e:
        raise ImageError(f"cannot convert mode {img.mode} to RGB: {e}", code="corrupt") from None


def open_image(path: str, limits: ImageLimits = FILE_LIMITS) -> Image.Image:
    """Read an image file (a local path or a pyarrow filesystem URI: s3://, gs://, ...) and decode it
    as `decode_image` does; a file that cannot be read is an ImageError too (code `unreadable`, or
    `not_a_file` for a folder, device or FIFO and `too_large` for a file over the limit, neither of
    which is read)."""
    from pixelray.storage import FileTooLargeError, read_file, split_uri

    fs, fs_path, _ = split_uri(path)
    try:
        data = read_file(fs, fs_path, limits.max_bytes)
    except FileTooLargeError as e:
        raise ImageError(str(e), status=413, code="too_large") from None
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e}", code=getattr(e, "code", "unreadable")) from None
    return decode_image(data, limits)


ImageInput = Image.Image | str | Path  # what the Python API takes: an image, or a path or URI to open


def as_image(image: ImageInput) -> Image.Image:
    return image if isinstance(image, Image.Image) else open_image(str(image))


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
