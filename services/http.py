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
    ``media_types`` maps a path to the one type it takes instead of JSON (a file upload route takes
    ``multipart/form-data`` and nothing else).
    """

    def __init__(self, app: ASGIApp, prefix: str = "/v1/",
                 media_types: dict[str, str] | None = None) -> None:
        self.app = app
        self.prefix = prefix
        self.media_types = {path: kind.encode() for path, kind in (media_types or {}).items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(
            self.prefix
        ):
            headers = dict(scope["headers"])
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            expected = self.media_types.get(scope["path"], b"application/json")
            if content_type != expected:
                shown = content_type.decode("latin-1") or "none"
                body = error_body(
                    "unsupported_media_type",
                    f"Content-Type is {shown}; send the body as {expected.decode()}",
                    "Content-Type",
                )
                await send({"type": "http.response.start", "status": 415,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
