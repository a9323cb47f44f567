"""Every HTTP request counted and timed for Prometheus (pixelray.telemetry: requests by model, route,
status and error type, and their latency from arrival to last byte), by an ASGI middleware around the
ingress app. What only the routes know reaches it through `note()`: the model a request went to (once it
is known to be served: a name a client made up never becomes a series) and the error's code. A stream
that fails after its status line counts as a 200 with the error's code."""

from __future__ import annotations

import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pixelray import telemetry

_labels: ContextVar[dict[str, str] | None] = ContextVar("pixelray_request_labels", default=None)


def note(**labels: str) -> None:
    """Label the request being answered: `model`, `error`."""
    if (current := _labels.get()) is not None:
        current.update(labels)


class Metered:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        labels, began, status = {"model": "", "error": ""}, time.perf_counter(), 500  # 500: it raised
        token = _labels.set(labels)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _labels.reset(token)
            route = getattr(scope.get("route"), "path", "other")  # the template: /v1/chat/completions, not a URL
            error = labels["error"] or (str(status) if status >= 400 else "")
            telemetry.SERVE_REQUESTS.inc(model=labels["model"], route=route, status=str(status), error=error)
            telemetry.SERVE_REQUEST_SECONDS.observe(time.perf_counter() - began, model=labels["model"], route=route)
