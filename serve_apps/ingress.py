"""The HTTP ingress: one FastAPI app (the seed routes, the OpenAI-compatible /v1 routes, /v1/embeddings
and /search) in front of the model, encoder and index deployments, built in its replica around the
replica's Server.

Every error is a JSON body {"error": {"message", "type", "code", "param"}} (protocol.ErrorResponse)
with a 4xx status for bad input (400 unreadable, 401 key, 403 a POST from a foreign web page's Origin,
404 model or store, 409 conversation, 413 too big, 421 a Host header naming another site, 422 bad
values), 503 when the models are overloaded, and for a hybrid model 503 when its LLM server cannot be reached or is
too slow, 502 when it answers with an error or garbage. Bodies are parsed by
the admission layer, not by FastAPI, so that the key and the size limit are checked before a byte
of a large upload is read. The Host header (and a POST's Origin) must name this server: localhost, its
address or `allowed_hosts`, so that a web page cannot reach a server on 127.0.0.1 through DNS rebinding.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pixelray.errors import PixelrayError
from pixelray.serve_apps import routes_openai, routes_search, routes_seed
from pixelray.serve_apps.fetch import normal_host
from pixelray.serve_apps.metering import Metered, note
from pixelray.serve_apps.protocol import ErrorResponse
from pixelray.serve_apps.server import Server
from pixelray.serve_apps.settings import AppArgs


async def _error(_: Request, e: PixelrayError) -> JSONResponse:
    note(error=e.code)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(ErrorResponse.of(e).model_dump(), status_code=e.status, headers=headers)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """FastAPI's own errors (an unknown route, a wrong method) in the same body."""
    return await _error(request, PixelrayError(str(e.detail), e.status_code))


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/health",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _host_of(value: str, url: bool = False) -> str | None:
    """The normalised host of a Host header (host[:port]) or of an Origin (scheme://host[:port]); None
    when it is not one."""
    try:
        parts = urlsplit(value if url else "//" + value)
        _ = parts.port
        if not parts.hostname or "@" in parts.netloc or (url and parts.scheme not in ("http", "https")) or \
                (not url and (parts.path or parts.query or parts.fragment)):
            return None
        return normal_host(parts.hostname)
    except ValueError:
        return None


def _address(scope: Scope) -> str | None:
    """The address the request came in on (the proxy's side of the connection)."""
    try:
        return normal_host(str(scope["server"][0]))
    except (KeyError, TypeError, IndexError, ValueError):
        return None


class HostCheck:
    """Refuses a request whose Host header names a site other than this server (421), and a state-changing
    one whose Origin does (403): the names allowed are localhost, 127.0.0.1, ::1, the address the request
    came in on, and `allowed_hosts` (`*.example.com` for its subdomains, `*` for any name)."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app, self.any = app, "*" in allowed_hosts
        self.names = {*LOCAL_NAMES, *(normal_host(h) for h in allowed_hosts if not h.startswith("*"))}
        self.suffixes = tuple("." + normal_host(h[2:]) for h in allowed_hosts if h.startswith("*."))

    def allows(self, host: str | None, scope: Scope) -> bool:
        return host is not None and (host in self.names or host.endswith(self.suffixes) or host == _address(scope))

    def refusal(self, scope: Scope) -> PixelrayError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
        if "host" in headers and not self.allows(_host_of(headers["host"]), scope):
            return PixelrayError(f"the Host header {headers['host'][:200]!r} does not name this server; a server "
                                 "called by another name lists it in allowed_hosts", 421, "host_not_allowed")
        if scope["method"] not in SAFE_METHODS and "origin" in headers and \
                not self.allows(_host_of(headers["origin"], url=True), scope):
            return PixelrayError(f"requests from the web page at {headers['origin'][:200]!r} are refused (its origin "
                                 "is not in allowed_hosts)", 403, "origin_not_allowed")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        checked = scope["type"] == "http" and not self.any and scope["path"] not in OPEN_PATHS
        if checked and (error := self.refusal(scope)) is not None:
            await (await _error(None, error))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    # the API's description (/docs, /redoc, /openapi.json) is public only where the API is: without a key
    public = server.args.api_key is None
    app = FastAPI(title="pixelray", description="caption, VQA, chat, embeddings, search and OpenAI-compatible "
                                                "endpoints",
                  docs_url="/docs" if public else None, redoc_url="/redoc" if public else None,
                  openapi_url="/openapi.json" if public else None)
    app.state.server = server
    app.add_exception_handler(PixelrayError, _error)
    app.add_exception_handler(HTTPException, _http_error)
    app.include_router(routes_seed.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_search.router)
    app.add_middleware(HostCheck, allowed_hosts=server.args.allowed_hosts)
    app.add_middleware(Metered)  # outermost: it counts what HostCheck refuses too
    return app


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, models: dict[str, DeploymentHandle], args: AppArgs, hybrid_models: list[str],
                 encoders: dict[str, DeploymentHandle] | None = None, stores: dict[str, DeploymentHandle] | None = None,
                 store_encoders: dict[str, str] | None = None):
        self.server = Server(models, args, hybrid_models, encoders, stores, store_encoders)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.server)
