"""One error shape, one place: ``{"error": {"message", "type", "param", "code"}}``.

Routes raise the ``APIError`` tree below; the layers under the API raise their own domain errors,
which ``DOMAIN_ERRORS`` maps to it. The handlers turn both (and FastAPI's own validation errors,
and anything unexpected) into OpenAI-shaped bodies. No traceback ever reaches a client.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunelab.evals.spec import SpecError
from tunelab.models.catalog import ModelNotFound
from tunelab.serving.chat import ServerBusy
from tunelab.serving.deployer import DeploymentFailed, DeploymentNotFound, NotDeployable
from tunelab.serving.generation import EngineUnavailable, GenerationRejected, PromptTooLong
from tunelab.serving.ratelimit import RateLimitExceeded
from tunelab.store.db import DeploymentNameTaken

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


class Forbidden(APIError):
    status = 403
    type = "invalid_request_error"
    code = "insufficient_permissions"


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
    DeploymentNameTaken: lambda e: Conflict(
        f"A deployment named '{e.name}' already exists in another project; choose another name.",
        param="deployment_name",
        code="DeploymentNameTaken",
    ),
    RateLimitExceeded: _rate_limited,
    SpecError: lambda e: InvalidRequest(e.message, param=e.param, code=e.code),
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
        param, message = _first_problem(exc.errors())
        return _respond(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _respond(exc.status_code, str(exc.detail), "invalid_request_error", None, code)

    # Not an exception handler for Exception: Starlette runs that one in ServerErrorMiddleware,
    # which re-raises after sending the 500, and uvicorn then closes the keep-alive connection.
    app.add_middleware(UnexpectedErrors)


_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _first_problem(errors: Any) -> tuple[str | None, str]:
    """The param a validation error names (``hyperparameters.n_epochs``) and one message for it.

    pydantic reports one error per member of a union (``int | "auto"``), with the member's tag in
    the location (``constrained-int``, ``literal['auto']``); those tags are dropped from the param
    and the members' messages joined: "Input should be less than or equal to 50, or input should
    be 'auto'".
    """

    def param_of(error: Any) -> str | None:
        loc = (
            error.get("loc", ())[1:]
            if error.get("loc", ())[:1] in (("body",), ("query",), ("path",))
            else error.get("loc", ())
        )
        parts = [str(p) for p in loc if isinstance(p, int) or (isinstance(p, str) and _FIELD.match(p))]
        return ".".join(parts) or None

    param = param_of(errors[0])
    messages: list[str] = []
    for error in errors:
        if param_of(error) == param and error.get("msg") and error["msg"] not in messages:
            messages.append(error["msg"])
    text = ", or ".join([messages[0], *(m[0].lower() + m[1:] for m in messages[1:])]) if messages else "invalid value"
    return param, text + (f" (at '{param}')" if param else "")


class UnexpectedErrors:
    """Any exception no handler knows becomes a logged, OpenAI-shaped 500, and the connection stays
    usable. A response already started (a stream) cannot change its status: the error is re-raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            body = json.dumps(
                error_body("The server had an error while processing your request.", "server_error")
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
