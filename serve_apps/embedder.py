"""The encoder deployment: one encoder per replica, embedding texts (with its text tower, a CLIP's) and
images into one space, with dynamic batching across requests.

    handle.info.remote()           -> EncoderInfo: dim, has_text, context_length, image_fit
    handle.embed.remote(inputs)    -> (float32 array [n, dim], prompt tokens); inputs: texts and decoded images

Each input is one item of `@serve.batch` (up to `max_batch_size` inputs from any requests, waiting at most
`batch_wait_timeout_s`): a batch's texts go through the text tower together and its images through the
vision tower together. Embeddings are L2-normalised (the index compares them by inner product: cosine).
As in model.py, a batch runs on the replica's event loop, so the inputs that arrive meanwhile form the
next batch. A text longer than the encoder's context is refused (a ValueError: the ingress's 400), not cut.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from PIL import Image
from ray import serve

from pixelray.encoders import create_encoder, resolve_encoder
from pixelray.images import ImageFit

Item = str | Image.Image


@dataclass(frozen=True)
class EncoderInfo:
    dim: int
    has_text: bool
    context_length: int | None  # the most tokens a text may have (None: no text tower, or no limit known)
    image_fit: ImageFit  # how far the ingress may scale an image down first: as far as `pixelray embed` does


@serve.deployment
class EmbeddingModel:
    def __init__(self, encoder: str, device: str = "auto", dtype: str = "fp32", max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.01):
        spec = resolve_encoder(encoder)
        self.encoder = create_encoder(spec, device=device, dtype=dtype, normalize=True, text=spec.has_text)
        pixels = self.encoder.preprocess([Image.new("RGB", (64, 64))])
        self.tokenizer = getattr(self.encoder, "tokenizer", None)
        self._info = EncoderInfo(dim=int(self.encoder.encode(pixels).embedding.shape[-1]),
                                 has_text=self.encoder.has_text,
                                 context_length=getattr(self.tokenizer, "context_length", None),
                                 image_fit=ImageFit.encoder_input(max(pixels.shape[-2:])))
        self.embed_batch.set_max_batch_size(max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def info(self) -> EncoderInfo:
        return self._info

    async def embed(self, inputs: list[Item]) -> tuple[np.ndarray, int]:
        """The inputs' embeddings [n, dim] in order, and the texts' tokens (images count none)."""
        tokens = self.count_tokens([(i, x) for i, x in enumerate(inputs) if isinstance(x, str)])
        vectors = await asyncio.gather(*(self.embed_batch(x) for x in inputs))
        for v in vectors:
            if isinstance(v, Exception):
                raise v
        return np.stack(vectors).astype(np.float32, copy=False), tokens

    def count_tokens(self, texts: list[tuple[int, str]]) -> int:
        """The texts' tokens as the text tower sees them (with its start and end tokens); a ValueError for
        a text past the context, or for any text when there is no text tower."""
        if not texts:
            return 0
        if not self._info.has_text:
            raise self._no_text_tower()
        encode, context = getattr(self.tokenizer, "encode", None), self._info.context_length
        if callable(encode) and context:  # open_clip's own BPE: the tokens, then start and end
            counts = [len(encode(text)) + 2 for _, text in texts]
            for (i, _), n in zip(texts, counts):
                if n > context:
                    raise ValueError(f"input {i} is {n} tokens, over the encoder's context of {context}: shorten it")
            return sum(counts)
        return int((self.tokenizer([t for _, t in texts]) != 0).sum())  # a hub tokenizer: its padded ids

    def _no_text_tower(self) -> ValueError:
        return ValueError(f"encoder {self.encoder.spec.name!r} has no text tower: it embeds images only")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def embed_batch(self, items: list[Item]) -> list[np.ndarray | Exception]:
        results: list[np.ndarray | Exception] = [None] * len(items)  # type: ignore[list-item]
        texts = [i for i, x in enumerate(items) if isinstance(x, str)]
        images = [i for i, x in enumerate(items) if not isinstance(x, str)]
        for indices, run in ((texts, self._texts), (images, self._images)):
            if not indices:
                continue
            try:  # a group that fails fails alone: the other group and other requests' items go on
                for i, vector in zip(indices, run([items[i] for i in indices])):
                    results[i] = vector
            except Exception as e:
                for i in indices:
                    results[i] = e
        return results

    def _texts(self, texts: list[str]) -> np.ndarray:
        if not self._info.has_text:
            raise self._no_text_tower()
        return self.encoder.encode_text(texts).float().cpu().numpy()

    def _images(self, images: list[Image.Image]) -> np.ndarray:
        return self.encoder.encode(self.encoder.preprocess(images)).embedding.float().cpu().numpy()
