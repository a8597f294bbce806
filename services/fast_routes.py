"""The hot routes, answered without BentoML's per-request machinery after admission.

Sentiment and forecast windows cost less to compute than to route: under load, most of an entry
worker's time went to Starlette's router, BentoML's endpoint wrapper, its serde and response objects
(py-spy, load/RESULTS.md). ``FastRoutes`` sits innermost, after every admission middleware
(services/admission.py), and answers a registered route itself: the body ``admission.Body`` has
already read and checked is validated by the route's pydantic model, handed to the same endpoint
method BentoML would call, and its answer written as JSON. The route stays a BentoML API, so the
OpenAPI document, the error shape and BentoML's request metrics are unchanged, and a route nobody
registered (or a worker still starting) goes on to BentoML.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from services.body_checks import JSON_BODY
from services.errors import report, send_error

Handler = Callable[[bytes], Awaitable[BaseModel]]
HANDLERS: dict[str, Handler] = {}  # route -> handler, registered by the entry service of this worker


def register(route: str, request_model: type[BaseModel], endpoint: Callable[[Any], Awaitable[BaseModel]]
             ) -> None:
    """Answers ``route`` with ``endpoint(request_model.model_validate_json(body))``: pydantic's JSON
    mode, as BentoML validates, so that every message is the same whichever path answers."""
    async def handler(body: bytes) -> BaseModel:
        return await endpoint(request_model.model_validate_json(body or b"{}"))

    HANDLERS[route] = handler


class FastRoutes:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = HANDLERS.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST" or JSON_BODY not in scope:
            await self.app(scope, receive, send)
            return
        try:
            answer = await handler(scope[JSON_BODY])
        except Exception as exc:
            # Counted as BentoML's endpoint path counts it (report: 5xx only), not a second time.
            await send_error(send, report(exc, scope["method"], scope["path"]), counted=True)
            return
        body = answer.__pydantic_serializer__.to_json(answer)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
