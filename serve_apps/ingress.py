"""The HTTP ingress: one FastAPI app (the seed routes and the OpenAI-compatible /v1 routes) in front of
the model deployments, built in its replica around the replica's Server.

Every error is a JSON body {"error": {"message", "type", "code", "param"}} (protocol.ErrorResponse)
with a 4xx status for bad input (400 unreadable, 401 key, 404 model, 409 conversation, 413 too big,
422 bad values), 503 when the models are overloaded, and for a hybrid model 503 when its LLM server
cannot be reached or is too slow, 502 when it answers with an error or garbage. Bodies are parsed by
the admission layer, not by FastAPI, so that the key and the size limit are checked before a byte
of a large upload is read.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from pixelray.errors import PixelrayError
from pixelray.serve_apps import routes_openai, routes_seed
from pixelray.serve_apps.protocol import ErrorResponse
from pixelray.serve_apps.server import Server
from pixelray.serve_apps.settings import AppArgs


async def _error(_: Request, e: PixelrayError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(ErrorResponse.of(e).model_dump(), status_code=e.status, headers=headers)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """FastAPI's own errors (an unknown route, a wrong method) in the same body."""
    return await _error(request, PixelrayError(str(e.detail), e.status_code))


def create_app(server: Server) -> FastAPI:
    # the API's description (/docs, /redoc, /openapi.json) is public only where the API is: without a key
    public = server.args.api_key is None
    app = FastAPI(title="pixelray", description="caption, VQA, chat and OpenAI-compatible endpoints",
                  docs_url="/docs" if public else None, redoc_url="/redoc" if public else None,
                  openapi_url="/openapi.json" if public else None)
    app.state.server = server
    app.add_exception_handler(PixelrayError, _error)
    app.add_exception_handler(HTTPException, _http_error)
    app.include_router(routes_seed.router)
    app.include_router(routes_openai.router)
    return app


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, models: dict[str, DeploymentHandle], args: AppArgs, hybrid_models: list[str]):
        self.server = Server(models, args, hybrid_models)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.server)
