"""Embeddings and search: OpenAI's /v1/embeddings over the served encoders, and /search over the stores'
indexes (the query embedded by the store's own encoder deployment, then looked up in the store's index
deployment). The same key, size limits, image limits and error bodies as every other route.

    POST /v1/embeddings   JSON: model, input (a text or data URL, or a list of them), encoding_format?, dimensions?
    POST /search          JSON: text or image (data URL or base64), k?, store? -> {store, model, results}
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from PIL import Image

from pixelray.errors import PixelrayError
from pixelray.serve_apps.inputs import image_from_data_url, image_from_query, is_image_input
from pixelray.serve_apps.protocol import EmbeddingRequest, EmbeddingResponse, SearchRequest, SearchResponse
from pixelray.serve_apps.server import Server, current

if TYPE_CHECKING:
    from pixelray.serve_apps.embedder import EncoderInfo

router = APIRouter()
DEFAULT_K = 10  # results of a /search that gives no k


@router.post("/v1/embeddings")
async def embeddings(request: Request, server: Server = Depends(current)) -> EmbeddingResponse:
    body: EmbeddingRequest = await server.admission.json(request, EmbeddingRequest)
    name, handle = server.encoder(body.model)
    inputs = body.inputs(server.args.max_embedding_inputs)
    info = await server.encoder_info(name, handle)
    if body.dimensions is not None and body.dimensions != info.dim:
        raise PixelrayError(f"dimensions {body.dimensions}: encoder {name} gives {info.dim}, and cannot give fewer",
                            400, "invalid_dimensions")
    images = {i for i, text in enumerate(inputs) if is_image_input(text)}
    if len(images) > server.args.max_images_per_request:
        raise PixelrayError(f"{len(images)} images in one request; at most {server.args.max_images_per_request}", 422,
                            "too_many_images")
    check_texts(server, name, info, [t for i, t in enumerate(inputs) if i not in images])
    items: list[str | Image.Image] = list(inputs)
    for i in sorted(images):
        items[i] = await fitted(info, await image_from_data_url(inputs[i], server.limits, f"input[{i}]"))
    vectors, tokens = await server.call(handle.embed, items, what="encoder")
    return EmbeddingResponse.of(name, vectors, tokens, body.encoding_format)


@router.post("/search")
async def search(request: Request, server: Server = Depends(current)) -> SearchResponse:
    body: SearchRequest = await server.admission.json(request, SearchRequest)
    store, index = server.store(body.store)
    query = body.query()
    k = body.k or min(DEFAULT_K, server.args.max_search_k)
    if k > server.args.max_search_k:
        raise PixelrayError(f"k {k} is over this server's limit of {server.args.max_search_k}", 422, "k_too_large")
    name = server.store_encoders[store]
    handle = server.encoders[name]
    info = await server.encoder_info(name, handle)
    if body.text is not None:
        check_texts(server, name, info, [query], f"store {store}'s ")
        item: str | Image.Image = query
    else:
        item = await fitted(info, await image_from_query(query, server.limits, server.args.image_url_allow_list,
                                                         "image", server.args.image_url_timeout_s))
    vectors, _ = await server.call(handle.embed, [item], what="encoder")
    hits = await server.call(index.search, vectors, k, what="index")
    return SearchResponse(store=store, model=name, results=hits[0])


def check_texts(server: Server, name: str, info: EncoderInfo, texts: list[str], whose: str = "") -> None:
    """A 400 for texts to an encoder without a text tower, a 413 for more text than `max_prompt_chars`."""
    if texts and not info.has_text:
        raise PixelrayError(f"{whose}encoder {name} has no text tower: it embeds images only", 400, "no_text_tower")
    chars = sum(len(t) for t in texts)
    if chars > server.args.max_prompt_chars:
        raise PixelrayError(f"the text is {chars:,} characters, over this server's limit of "
                            f"{server.args.max_prompt_chars:,}", 413, "prompt_too_long")


async def fitted(info: EncoderInfo, image: Image.Image) -> Image.Image:
    """The image scaled down (in a thread) as far as the encoder lets it be, as `pixelray embed` does."""
    return await asyncio.to_thread(info.image_fit.apply, image)
