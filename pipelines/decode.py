"""The CPU stage every batch job shares: bytes -> validated RGB images, bad ones -> error rows.

Each image is made as small as its model allows as soon as it is decoded (an ImageFit), so that a batch never
holds its images at full size: a 24 MP photo is 72 MB of pixels, and a batch of 32 of them 2.3 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from pixelray.images import ImageError, ImageFit, ImageLimits, decode_image


@dataclass
class Decoded:
    images: dict[int, Image.Image]  # row index -> RGB image, for the rows that decoded
    width: np.ndarray
    height: np.ndarray
    error_type: list[str]
    error: list[str]

    def fail(self, i: int, kind: str, message: str) -> None:
        self.images.pop(i, None)
        self.error_type[i], self.error[i] = kind, message

    def columns(self, batch: dict[str, np.ndarray], **stage_columns) -> dict[str, np.ndarray]:
        """The input's columns (without the raw bytes), the image size and errors, and the stage's own."""
        out = {k: v for k, v in batch.items() if k not in ("data", "error_type", "error")}
        out.update(width=self.width, height=self.height, **stage_columns)
        out.update(error_type=np.array(self.error_type, dtype=str), error=np.array(self.error, dtype=str))
        return out


def error_columns(batch: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """`error_type` and `error` as Arrow columns, null for the rows without an error (the sink's cue)."""
    failed = batch["error"] != ""
    return {name: pa.array(np.where(failed, batch[name], None), pa.string()) for name in ("error_type", "error")}


def decode_rows(batch: dict[str, np.ndarray], limits: ImageLimits, fit: ImageFit | None = None) -> Decoded:
    """Decode each row's `data` unless an earlier stage already recorded an error for it, and scale it down
    to `fit` at once; `width` and `height` stay the decoded image's own."""
    n = len(batch["data"])
    out = Decoded({}, np.zeros(n, np.int32), np.zeros(n, np.int32), list(batch["error_type"]),
                  list(batch["error"]))
    for i, data in enumerate(batch["data"]):
        if out.error[i]:
            continue
        try:
            img = decode_image(data, limits)
        except ImageError as e:
            out.fail(i, e.code, e.message)
            continue
        out.width[i], out.height[i] = img.size
        out.images[i] = fit.apply(img) if fit else img
    return out
