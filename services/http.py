"""ASGI middleware for the public entry service."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    """The one error shape every endpoint returns for its own errors."""
    return json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()


class JsonOnlyMiddleware:
    """Rejects POSTs to the API whose body is not JSON with 415, before any parsing.

    BentoML falls back to its JSON parser for an unknown content type, which would accept
    ``text/plain`` bodies silently; a client that sends the wrong type should be told.
    """

    def __init__(self, app: ASGIApp, prefix: str = "/v1/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(
            self.prefix
        ):
            headers = dict(scope["headers"])
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if content_type != b"application/json":
                shown = content_type.decode("latin-1") or "none"
                body = error_body(
                    "unsupported_media_type",
                    f"Content-Type is {shown}; send the body as application/json",
                    "Content-Type",
                )
                await send({"type": "http.response.start", "status": 415,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
