"""Request inputs -> what the generators take: images from uploads, data URLs and (only when
allow-listed) http(s) URLs, and OpenAI messages -> the chat format plus their images.

Every failure raises `APIError` with the HTTP status and a message that says what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

from PIL import Image

from pixelray.generators import Message
from pixelray.images import ImageError, ImageLimits, decode_image
from serve_apps.protocol import ChatMessage

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*?;base64,(?P<data>.*)$", re.DOTALL)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def image_from_bytes(data: bytes, limits: ImageLimits, what: str = "image") -> Image.Image:
    try:
        return decode_image(data, limits)
    except ImageError as e:
        raise APIError(413 if e.kind == "too_large" else 400, f"{what}: {e}", e.kind) from None


def image_from_data_url(url: str, limits: ImageLimits, what: str = "image") -> Image.Image:
    match = _DATA_URL.match(url.strip())
    if not match:
        raise APIError(400, f"{what}: expected a base64 data URL (data:image/png;base64,...)", "bad_image_url")
    if len(match["data"]) > limits.max_bytes * 4 // 3 + 4:
        raise APIError(413, f"{what}: over the limit of {limits.max_bytes:,} bytes", "too_large")
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{what}: the data URL is not valid base64", "bad_base64") from None
    return image_from_bytes(data, limits, what)


async def image_from_url(url: str, limits: ImageLimits, allowed_hosts: list[str], what: str = "image") -> Image.Image:
    """A data URL, or an http(s) URL whose host is allow-listed (fetched without redirects, size
    capped). Local paths, file:// and every other scheme are refused: no server-side request forgery."""
    if url.startswith("data:"):
        return image_from_data_url(url, limits, what)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise APIError(400, f"{what}: only base64 data URLs are accepted (and http(s) URLs from allow-listed hosts)",
                       "bad_image_url")
    if parts.hostname not in allowed_hosts:
        raise APIError(400, f"{what}: remote image URLs are refused (host {parts.hostname!r} is not in the "
                            "server's image_url_hosts allow-list); send the image as a base64 data URL",
                       "url_not_allowed")
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise APIError(400, f"{what}: fetching {url} gave HTTP {response.status}", "fetch_failed")
            data = await response.content.read(limits.max_bytes + 1)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise APIError(400, f"{what}: fetching {url} failed: {e}", "fetch_failed") from None
    return image_from_bytes(data, limits, what)


async def openai_conversation(messages: list[ChatMessage], limits: ImageLimits, allowed_hosts: list[str],
                              max_images: int) -> tuple[list[Message], list[Image.Image]]:
    """OpenAI messages -> (conversation in the chat format, its images in order)."""
    conversation: list[Message] = []
    images: list[Image.Image] = []
    for i, message in enumerate(messages):
        if message.content is None:
            raise APIError(422, f"messages[{i}]: content is missing", "missing_content")
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
                raise APIError(422, f"{where}: an image_url part needs image_url.url", "missing_image_url")
            elif role != "user":
                raise APIError(422, f"{where}: images belong in user messages", "image_not_in_user_message")
            else:
                images.append(await image_from_url(part.image_url.url, limits, allowed_hosts, where))
                content.append({"type": "image"})
        conversation.append({"role": role, "content": content})
    if len(images) > max_images:
        raise APIError(422, f"{len(images)} images in one request; at most {max_images}", "too_many_images")
    if not any(m["role"] == "user" for m in conversation):
        raise APIError(422, "messages need at least one user message", "no_user_message")
    return conversation, images
