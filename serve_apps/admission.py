"""Admission: what every route checks before it reads a request (the API key, the declared size), and
the body read and validated into its typed request (protocol.py), so that a large upload without the
key is refused before a byte of it is read. Every refusal is a PixelrayError with its HTTP status.

Bodies are read as a stream whatever the client declares (a chunked body has no Content-Length):
past `max_request_bytes` the read stops with a 413, and a body that has not fully arrived within
`body_timeout_s` is a 408, so a client trickling bytes cannot hold the ingress's request slots."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from pixelray.errors import PixelrayError, validation_message


def validated(model: type[BaseModel], data: Any) -> Any:
    """`data` as a `model`, or a 422 that says which values are wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PixelrayError(validation_message(e), 422, "invalid_parameters") from None
    except RecursionError:
        raise PixelrayError("the request is nested too deeply", 400, "invalid_json") from None


class Admission:
    def __init__(self, api_key: str | None, max_request_bytes: int, max_image_bytes: int, body_timeout_s: float):
        self.api_key = api_key.encode() if api_key is not None else None
        self.max_request_bytes, self.max_image_bytes = max_request_bytes, max_image_bytes
        self.body_timeout_s = body_timeout_s

    def admit(self, request: Request) -> None:
        """The API key (when one is configured) and the declared request size, before the body is read."""
        if self.api_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key):
                raise PixelrayError("missing or wrong API key: send 'Authorization: Bearer <key>'", 401,
                                    "invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            raise PixelrayError(f"request body is {int(length):,} bytes, over the limit of "
                                f"{self.max_request_bytes:,}", 413, "request_too_large")

    async def json(self, request: Request, model: type[BaseModel]) -> Any:
        """A JSON object body as a `model`."""
        self.admit(request)
        body = b"".join([chunk async for chunk in self.stream(request)])
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PixelrayError(f"the body is not valid JSON: {e}", 400, "invalid_json") from None
        except RecursionError:
            raise PixelrayError("the body's JSON is nested too deeply", 400, "invalid_json") from None
        if not isinstance(data, dict):
            raise PixelrayError("the body must be a JSON object", 400, "invalid_json")
        return validated(model, data)

    async def form(self, request: Request, model: type[BaseModel]) -> tuple[Any, bytes]:
        """A multipart form: its fields as a `model`, and its `image` file's bytes (at most the image
        limit and one byte more: the decoder refuses what is over it)."""
        self.admit(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise PixelrayError("send multipart/form-data with an 'image' file field", 400, "not_multipart")
        parser = MultiPartParser(request.headers, self.stream(request), max_files=1, max_fields=16)
        try:
            form = await parser.parse()
        except (MultiPartException, HTTPException) as e:
            detail = getattr(e, "message", None) or getattr(e, "detail", "")
            raise PixelrayError(f"unreadable multipart form: {detail}", 400, "bad_form") from None
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise PixelrayError("the 'image' file field is missing", 422, "missing_image")
            data = await upload.read(self.max_image_bytes + 1)
        finally:
            await form.close()  # the spooled upload
        fields = {k: v for k, v in form.items() if k != "image" and v != ""}
        return validated(model, fields), data

    async def stream(self, request: Request) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive: a 413 past the size limit, a 408 past the time limit."""
        size = 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        chunks = request.stream()
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks, None)
            except TimeoutError:
                raise PixelrayError(f"the request body did not arrive within {self.body_timeout_s:g} s", 408,
                                    "request_timeout") from None
            if chunk is None:
                return
            size += len(chunk)
            if size > self.max_request_bytes:
                raise PixelrayError(f"request body is over the limit of {self.max_request_bytes:,} bytes", 413,
                                    "request_too_large")
            yield chunk
