"""Searching a feature store: its index (built by `pixelray index`), and queries embedded as its rows were.

    index = open_index("runs/features")                        # OUT/index/, read-only
    queries = query_vectors(index.manifest, texts=["a red star"])  # the store's own encoder, its text tower
    hits = index.search(queries, k=10)[0]                      # [Hit(image_id, path, score, columns), ...]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pixelray.encoders import Encoder, create_encoder, resolve_encoder
from pixelray.images import ImageInput, as_image
from pixelray.vector_index import Hit, StoreIndex, open_index  # noqa: F401  (the index's read side, re-exported)


def store_encoder(manifest: dict[str, Any], device: str = "auto", text: bool = False) -> Encoder:
    """The encoder that embedded a store, by its registry name where it has one (the folder it was loaded
    from may be another machine's), else by the source the store records."""
    if manifest.get("job") != "embed" or not manifest.get("encoder"):
        raise ValueError("the store was not written by `pixelray embed`: it records no encoder")
    try:
        spec = resolve_encoder(manifest["encoder"])
    except ValueError:
        spec = resolve_encoder(manifest.get("encoder_source") or manifest["encoder"])
    return create_encoder(spec, device=device, text=text, normalize=True)


def query_vectors(manifest: dict[str, Any], texts: list[str] | None = None, images: list[ImageInput] | None = None,
                  device: str = "auto", encoder: Encoder | None = None) -> np.ndarray:
    """Texts or images -> float32 [n, dim] queries, L2-normalised, in the store's space."""
    if bool(texts) == bool(images):
        raise ValueError("give a text query or an image query (one of them)")
    if texts is not None and not all(t and t.strip() for t in texts):
        raise ValueError("the text query is empty")
    encoder = encoder or store_encoder(manifest, device, text=bool(texts))
    out = encoder.encode_text(texts, normalize=True) if texts else encoder.encode(
        encoder.preprocess([as_image(i) for i in images]), normalize=True).embedding
    return out.float().cpu().numpy()

