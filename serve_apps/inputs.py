"""Request inputs -> what the generators take: images from uploads, data URLs and (only when
allow-listed) http(s) URLs, and OpenAI messages -> the chat format plus their images.

Every failure raises a PixelrayError with the HTTP status and a message that says what was wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re

from PIL import Image

from pixelray import telemetry
from pixelray.generators import Message
from pixelray.errors import PixelrayError
from pixelray.images import ImageError, ImageLimits, decode_image
from pixelray.serve_apps.fetch import AllowedHost, fetch_url
from pixelray.serve_apps.protocol import ChatMessage

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*?;base64,(?P<data>.*)$", re.DOTALL)


# Images decode in threads, never on the ingress's event loop (a large one takes seconds and would stall
# every route), and at most this many at once: each may hold up to max_image_pixels x 3 bytes.
DECODES_AT_ONCE = 4
_decoding = asyncio.Semaphore(DECODES_AT_ONCE)


def refused(error: PixelrayError) -> PixelrayError:
    """`error`, counted as an image refused (pixelray.telemetry: by its code)."""
    telemetry.SERVE_IMAGES.inc(outcome="refused", reason=error.code)
    return error


async def image_from_bytes(data: bytes, limits: ImageLimits, what: str = "image") -> Image.Image:
    async with _decoding:
        try:
            image = await asyncio.to_thread(decode_image, data, limits)
        except ImageError as e:
            raise refused(ImageError(f"{what}: {e.message}", e.status, e.code)) from None
    telemetry.SERVE_IMAGES.inc(outcome="decoded", reason="")
    return image


async def image_from_data_url(url: str, limits: ImageLimits, what: str = "image") -> Image.Image:
    match = _DATA_URL.match(url.strip())
    if not match:
        raise refused(PixelrayError(f"{what}: expected a base64 data URL (data:image/png;base64,...)", 400,
                                    "bad_image_url"))
    if len(match["data"]) > limits.max_bytes * 4 // 3 + 4:
        raise refused(PixelrayError(f"{what}: over the limit of {limits.max_bytes:,} bytes", 413, "too_large"))
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise refused(PixelrayError(f"{what}: the data URL is not valid base64", 400, "bad_base64")) from None
    return await image_from_bytes(data, limits, what)


async def image_from_url(url: str, limits: ImageLimits, allowed_hosts: list[AllowedHost], what: str = "image",
                         timeout_s: float = 10.0) -> Image.Image:
    """A data URL, or an http(s) URL on the allow-list (`host` for ports 80 and 443, or `host:port`), fetched
    as fetch.py says: never from the server's own network unless listed as an IP address, no redirects, size
    capped, within `timeout_s`. Local paths, file:// and every other scheme are refused."""
    if url.startswith("data:"):
        return await image_from_data_url(url, limits, what)
    try:
        data = await fetch_url(url, allowed_hosts, limits.max_bytes, timeout_s, what)
    except PixelrayError as e:
        raise refused(e) from None
    return await image_from_bytes(data, limits, what)


def is_image_input(text: str) -> bool:
    """Whether a /v1/embeddings input is an image: a data URL of one (data:image/...;base64,...)."""
    return text.startswith("data:image/")


async def image_from_query(value: str, limits: ImageLimits, allowed_hosts: list[AllowedHost], what: str = "image",
                           timeout_s: float = 10.0) -> Image.Image:
    """/search's image: a data URL, an http(s) URL as `image_from_url` allows, or bare base64."""
    if value.startswith(("data:", "http://", "https://")):
        return await image_from_url(value, limits, allowed_hosts, what, timeout_s)
    return await image_from_data_url("data:;base64," + value, limits, what)


async def openai_conversation(messages: list[ChatMessage], limits: ImageLimits, allowed_hosts: list[AllowedHost],
                              max_images: int, timeout_s: float = 10.0) -> tuple[list[Message], list[Image.Image]]:
    """OpenAI messages -> (conversation in the chat format, its images in order). The images are counted
    before any of them is fetched or decoded."""
    parts = sum(1 for m in messages if isinstance(m.content, list) for p in m.content if p.type != "text")
    if parts > max_images:
        raise PixelrayError(f"{parts} images in one request; at most {max_images}", 422, "too_many_images")
    conversation: list[Message] = []
    images: list[Image.Image] = []
    for i, message in enumerate(messages):
        if message.content is None:
            raise PixelrayError(f"messages[{i}]: content is missing", 422, "missing_content")
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            conversation.append({"role": role, "content": [{"type": "text", "text": message.content}]})
            continue
        content = []
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                content.append({"type": "text", "text": part.text or ""})
            elif part.image_url is None:
                raise PixelrayError(f"{where}: an image_url part needs image_url.url", 422, "missing_image_url")
            elif role != "user":
                raise PixelrayError(f"{where}: images belong in user messages", 422, "image_not_in_user_message")
            else:
                images.append(await image_from_url(part.image_url.url, limits, allowed_hosts, where, timeout_s))
                content.append({"type": "image"})
        conversation.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in conversation):
        raise PixelrayError("messages need at least one user message", 422, "no_user_message")
    return conversation, images
