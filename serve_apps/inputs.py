"""Request inputs -> what the generators take: images from uploads, data URLs and (only when
allow-listed) http(s) URLs, and OpenAI messages -> the chat format plus their images.

Every failure raises a PixelrayError with the HTTP status and a message that says what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

from PIL import Image

from pixelray.generators import Message
from pixelray.errors import PixelrayError
from pixelray.images import ImageError, ImageLimits, decode_image
from pixelray.serve_apps.protocol import ChatMessage

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*?;base64,(?P<data>.*)$", re.DOTALL)


def image_from_bytes(data: bytes, limits: ImageLimits, what: str = "image") -> Image.Image:
    try:
        return decode_image(data, limits)
    except ImageError as e:
        raise ImageError(f"{what}: {e.message}", e.status, e.code) from None


def image_from_data_url(url: str, limits: ImageLimits, what: str = "image") -> Image.Image:
    match = _DATA_URL.match(url.strip())
    if not match:
        raise PixelrayError(f"{what}: expected a base64 data URL (data:image/png;base64,...)", 400, "bad_image_url")
    if len(match["data"]) > limits.max_bytes * 4 // 3 + 4:
        raise PixelrayError(f"{what}: over the limit of {limits.max_bytes:,} bytes", 413, "too_large")
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise PixelrayError(f"{what}: the data URL is not valid base64", 400, "bad_base64") from None
    return image_from_bytes(data, limits, what)


async def image_from_url(url: str, limits: ImageLimits, allowed_hosts: list[str], what: str = "image") -> Image.Image:
    """A data URL, or an http(s) URL whose host is allow-listed (fetched without redirects, size
    capped). Local paths, file:// and every other scheme are refused: no server-side request forgery."""
    if url.startswith("data:"):
        return image_from_data_url(url, limits, what)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise PixelrayError(f"{what}: only base64 data URLs are accepted (and http(s) URLs from allow-listed hosts)",
                            400, "bad_image_url")
    if parts.hostname not in allowed_hosts:
        raise PixelrayError(f"{what}: remote image URLs are refused (host {parts.hostname!r} is not in the "
                            "server's image_url_hosts allow-list); send the image as a base64 data URL", 400,
                            "url_not_allowed")
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise PixelrayError(f"{what}: fetching {url} gave HTTP {response.status}", 400, "fetch_failed")
            data = await response.content.read(limits.max_bytes + 1)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise PixelrayError(f"{what}: fetching {url} failed: {e}", 400, "fetch_failed") from None
    return image_from_bytes(data, limits, what)


async def openai_conversation(messages: list[ChatMessage], limits: ImageLimits, allowed_hosts: list[str],
                              max_images: int) -> tuple[list[Message], list[Image.Image]]:
    """OpenAI messages -> (conversation in the chat format, its images in order)."""
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
                images.append(await image_from_url(part.image_url.url, limits, allowed_hosts, where))
                content.append({"type": "image"})
        conversation.append({"role": role, "content": content})
    if len(images) > max_images:
        raise PixelrayError(f"{len(images)} images in one request; at most {max_images}", 422, "too_many_images")
    if not any(m["role"] == "user" for m in conversation):
        raise PixelrayError("messages need at least one user message", 422, "no_user_message")
    return conversation, images
