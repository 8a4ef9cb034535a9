"""One error shape, one place: ``{"error": {"message", "type", "param", "code"}}``.

Routes raise the ``APIError`` tree below; the layers under the API raise their own domain errors,
which ``DOMAIN_ERRORS`` maps to it. The handlers turn both (and FastAPI's own validation errors,
and anything unexpected) into OpenAI-shaped bodies. No traceback ever reaches a client.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.models.catalog import ModelNotFound
from tunelab.serving.chat import ServerBusy
from tunelab.serving.deployer import DeploymentFailed, DeploymentNotFound, NotDeployable
from tunelab.serving.generation import EngineUnavailable, GenerationRejected, PromptTooLong
from tunelab.serving.ratelimit import RateLimitExceeded

log = logging.getLogger("tunelab.api")


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(APIError):
    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.type = limit  # "requests" or "tokens": the limit that was hit, as OpenAI reports it


class ServiceUnavailable(APIError):
    status = 503
    code = "engine_unavailable"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "file_too_large"


def _rate_limited(e: RateLimitExceeded) -> RateLimited:
    d = e.decision
    headers = d.headers()
    return RateLimited(
        f"Requests to deployment '{e.deployment}' have exceeded its {e.limit} rate limit ({d.limit_requests} requests, "
        f"{d.limit_tokens} tokens per minute at capacity {e.capacity}). Please retry after "
        f"{math.ceil(d.retry_after)} seconds.",
        limit=e.limit,
        headers=headers,
    )


# Domain error -> the API error a client gets. The message and param come from where the error
# surfaces (a deployment name is the chat request's model).
DOMAIN_ERRORS: dict[type[Exception], Callable[[Any], APIError]] = {
    DeploymentNotFound: lambda e: NotFound(
        f"The API deployment for this resource does not exist: '{e.name}'. Create it with the deployments API.",
        param="model",
        code="DeploymentNotFound",
    ),
    DeploymentFailed: lambda e: APIError(str(e), code="DeploymentFailed"),
    NotDeployable: lambda e: InvalidRequest(
        f"Model '{e.model}' does not exist; use a base model, a fine-tuned model or a checkpoint id.",
        param="properties.model.name",
        code="DeploymentModelNotSupported",
    ),
    ModelNotFound: lambda e: NotFound(f"The model '{e}' does not exist", param="model", code="model_not_found"),
    PromptTooLong: lambda e: InvalidRequest(str(e), param="messages", code="context_length_exceeded"),
    RateLimitExceeded: _rate_limited,
    ServerBusy: lambda e: _busy(e),
    EngineUnavailable: lambda e: ServiceUnavailable(str(e), headers=_retry(e.retry_after)),
    GenerationRejected: lambda e: InvalidRequest(str(e), code="invalid_value"),
}


def _busy(e: ServerBusy) -> RateLimited:
    """Every generation slot is taken: 429 with retry-after, which the SDK's retries honour."""
    error = RateLimited(str(e), limit="requests", headers=_retry(e.retry_after))
    error.code = "server_busy"
    return error


def _retry(seconds: float) -> dict[str, str]:
    return {"retry-after": str(math.ceil(seconds)), "retry-after-ms": str(math.ceil(seconds * 1000))}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _respond(
    status: int, message: str, type: str, param: str | None, code: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _respond(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    for domain, to_api in DOMAIN_ERRORS.items():

        async def _domain(_: Request, exc: Exception, to_api: Callable[[Any], APIError] = to_api) -> JSONResponse:
            e = to_api(exc)
            return _respond(e.status, e.message, e.type, e.param, e.code, e.headers)

        app.add_exception_handler(domain, _domain)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = f"{first.get('msg', 'invalid value')}" + (f" (at '{param}')" if param else "")
        return _respond(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _respond(exc.status_code, str(exc.detail), "invalid_request_error", None, code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _respond(500, "The server had an error while processing your request.", "server_error", None, None)
