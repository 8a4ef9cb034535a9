"""A bound on request bodies, before anything reads them: 413 rather than a server that swallows
gigabytes of JSON. File uploads (multipart) have their own, larger limit, enforced as they stream
to disk (``TUNELAB_MAX_UPLOAD_BYTES``); this middleware only refuses one larger than that."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunelab.api.errors import error_body


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, upload_bytes: int) -> None:
        self.app, self.max_bytes, self.upload_bytes = app, max_bytes, upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
        # An upload may carry the form's other fields and boundaries on top of the file.
        limit = self.upload_bytes + 1024 * 1024 if multipart else self.max_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        seen, over = 0, False

        async def counting() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # the app sees the client gone; its answer is replaced below
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def sending(message: Message) -> None:
            if not over:
                await send(message)
            elif message["type"] == "http.response.start":
                await _refuse(send, limit)

        await self.app(scope, counting, sending)


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(
        error_body(
            f"The request body is larger than the {limit}-byte limit.",
            "invalid_request_error",
            None,
            "request_too_large",
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
