"""What the entry service lets in: small ASGI middlewares, one concern each, added outermost first.

``services/api.py`` adds them in this order:

1. ``Routes``: an unknown path is a 404 and a known path with another method a 405 (with ``Allow``),
   in the error shape, before anything else runs; an exception that escapes the app is a shaped 500.
2. ``Token``: the optional API token on the state-changing paths (401).
3. ``InFlight``: at most ``max_in_flight`` API requests in progress per worker (503 + Retry-After).
   BentoML's own ``traffic.max_concurrency`` is not used: its 429 carries no Retry-After.
4. ``Body``: the media type the endpoint takes (415), the body limit (413, from Content-Length and
   while streaming), the time to receive it (408), and a body that no parser should see (400:
   invalid UTF-8 or JSON, too deep, a number out of float range, a multipart form unlike the one
   the endpoint declares; ``services/body_checks.py``).
5. ``Deadline``: no answer started within the timeout is a 503 ``timeout``.

Each refuses with a ``ServiceError`` written by ``services.errors.send_error``; the API routes under
``prefix`` (POST) are the only ones checked by 2-5.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.bentoml_compat import STATIC_PREFIXES, SYSTEM_PATHS
from services.body_checks import JSON_BODY, FormSpec, check_multipart, parse_json
from services.errors import ServiceError, log_error, send_error, to_service_error
from services.settings import SETTINGS

logger = logging.getLogger(__name__)

# BentoML's own routes of the entry, all read-only (the one list: services/bentoml_compat.py).
SYSTEM_ROUTES = {path: ("GET", "HEAD") for path in SYSTEM_PATHS}


def is_api_request(scope: Scope, prefix: str) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(prefix)


class Routes:
    """404 / 405 in the error shape for what no route answers; a shaped 500 for an escaped exception."""

    def __init__(self, app: ASGIApp, *, api_routes: Iterable[str]) -> None:
        self.app = app
        self.methods = {**SYSTEM_ROUTES, **{route: ("POST",) for route in api_routes}}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        allowed = self.methods.get(path)
        if allowed is None and not (path.startswith(STATIC_PREFIXES) and method in ("GET", "HEAD")):
            await self._refuse(scope, send, ServiceError(404, "not_found", "No endpoint at this path; "
                                                         "/docs.json lists them.", None))
            return
        if allowed is not None and method not in allowed:
            await self._refuse(scope, send, ServiceError(
                405, "method_not_allowed", f"This path takes {' or '.join(allowed)}, not {method[:16]}."),
                [(b"allow", ", ".join(allowed).encode())])
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            error = to_service_error(exc)
            log_error(method, path, error, exc)
            if started:
                raise
            await send_error(send, error)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, error: ServiceError,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        log_error(scope["method"], scope["path"], error)
        await send_error(send, error, headers)


class Token:
    """``Authorization: Bearer <token>`` (or ``X-API-Token``) on the paths under ``paths``."""

    def __init__(self, app: ASGIApp, *, token: str, paths: Iterable[str], prefix: str = "/v1/") -> None:
        self.app, self.token, self.prefix = app, token, prefix
        self.paths = tuple(p.strip() for p in paths if p.strip())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.token and is_api_request(scope, self.prefix) and scope["path"].startswith(self.paths)
                and not token_ok(dict(scope["headers"]), self.token)):
            await send_error(send, ServiceError(401, "unauthorized", "This endpoint changes state and needs "
                                                "the API token: send 'Authorization: Bearer <token>'.",
                                                "Authorization"), [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


def token_ok(headers: dict[bytes, bytes], token: str) -> bool:
    """True when ``Authorization: Bearer <token>`` or ``X-API-Token: <token>`` matches (constant time);
    an empty configured token disables the check."""
    if not token:
        return True
    sent = headers.get(b"x-api-token", b"")
    authorization = headers.get(b"authorization", b"")
    if authorization[:7].lower() == b"bearer ":
        sent = authorization[7:].strip()
    return hmac.compare_digest(sent, token.encode())


class InFlight:
    """At most ``limit`` API requests in progress in this worker; past it 503 + Retry-After."""

    def __init__(self, app: ASGIApp, *, limit: int, prefix: str = "/v1/") -> None:
        self.app, self.limit, self.prefix = app, limit, prefix
        self.count = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_api_request(scope, self.prefix):
            await self.app(scope, receive, send)
            return
        if self.count >= self.limit:
            await send_error(send, ServiceError(503, "overloaded", f"{self.count} requests are in progress; "
                                                f"the limit is {self.limit} (RNNSERVE_MAX_IN_FLIGHT). Retry "
                                                f"after {SETTINGS.http.retry_after_s} s."))
            return
        self.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1


class Body:
    """The media type, size and well-formedness of an API request's body, checked before any parser."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_limits: dict[str, int] | None = None,
                 media_types: dict[str, str] | None = None, forms: dict[str, FormSpec] | None = None,
                 max_json_depth: int, body_timeout_s: float = 20.0, no_fields: frozenset[str] = frozenset(),
                 prefix: str = "/v1/") -> None:
        self.app, self.prefix, self.body_timeout_s = app, prefix, body_timeout_s
        self.no_fields = no_fields  # routes that take no input: a field there is a typo
        self.max_body_bytes, self.body_limits = max_body_bytes, dict(body_limits or {})
        self.media_types = {path: kind.encode() for path, kind in (media_types or {}).items()}
        self.forms, self.max_json_depth = dict(forms or {}), max_json_depth

    def limit(self, path: str) -> int:
        return body_limit_for(path, self.max_body_bytes, self.body_limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_api_request(scope, self.prefix):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        content_types = [v for k, v in scope["headers"] if k == b"content-type"]
        content_type = content_types[0].split(b";")[0].strip().lower() if content_types else b""
        expected = self.media_types.get(path, b"application/json")
        if len(content_types) > 1 or content_type != expected:
            shown = "several" if len(content_types) > 1 else (content_type.decode("latin-1")[:100] or "none")
            message = f"Content-Type is {shown}; send one Content-Type: {expected.decode()}"
            await send_error(send, ServiceError(415, "unsupported_media_type", message, "Content-Type"))
            return
        limit = self.limit(path)
        try:
            declared = int(dict(scope["headers"]).get(b"content-length", b"0"))
        except ValueError:
            declared = -1
        if declared < 0:
            await send_error(send, ServiceError(400, "invalid_request", "Content-Length is not a "
                                                "non-negative integer.", "Content-Length"))
            return
        if declared > limit:
            await send_error(send, too_large(limit, declared))
            return
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body, last, over = await read_body(receive, limit)
        except TimeoutError:
            await send_error(send, ServiceError(408, "body_timeout", f"The body did not arrive within "
                                                f"{self.body_timeout_s:g} s."))
            return
        if over:
            await send_error(send, too_large(limit))
            return
        if content_type == b"application/json":
            try:
                value = parse_json(body, self.max_json_depth) if body else {}
            except ServiceError as error:
                await send_error(send, error)
                return
            if path in self.no_fields and value != {}:
                await send_error(send, ServiceError(400, "unknown_field", "This endpoint takes no fields; "
                                                    "send {} or no body.", None))
                return
            scope[JSON_BODY] = body
        elif (problem := await check_multipart(body, scope["headers"], self.forms.get(path))) is not None:
            await send_error(send, problem)
            return
        await self.app(scope, replay(body, last, receive), send)


def body_limit_for(path: str, default: int, body_limits: dict[str, int]) -> int:
    """The body limit of the longest matching path prefix in ``body_limits``, else ``default``."""
    matches = [prefix for prefix in body_limits if path.startswith(prefix)]
    return body_limits[max(matches, key=len)] if matches else default


def too_large(limit: int, size: int | None = None) -> ServiceError:
    seen = f"{size:,} bytes" if size is not None else "more"
    return ServiceError(413, "body_too_large", f"The body is {seen}; the limit for this endpoint is "
                        f"{limit:,} bytes.")


async def read_body(receive: Receive, limit: int) -> tuple[bytes, Message | None, bool]:
    """The whole body, counted as it streams: (body, the last message, whether it passed ``limit``)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message, False  # the client went away while sending
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", message, True
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None, False


def replay(body: bytes, last: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body over once, then defers to the client."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return last if last is not None else {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class Deadline:
    """A request whose answer has not started within ``timeout_s`` is a 503 ``timeout``.

    Set just under BentoML's ``traffic.timeout``, so that this shaped answer comes before BentoML's
    bare 504. Uses ``asyncio.timeout`` (no extra task per request); the first byte lifts it, so a
    stream may take as long as it needs once it has started.
    """

    def __init__(self, app: ASGIApp, *, timeout_s: float, prefix: str = "/v1/") -> None:
        self.app, self.timeout_s, self.prefix = app, timeout_s, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_api_request(scope, self.prefix):
            await self.app(scope, receive, send)
            return
        deadline = asyncio.timeout(self.timeout_s)
        started = False

        async def lifting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                deadline.reschedule(None)
            await send(message)

        try:
            async with deadline:
                await self.app(scope, receive, lifting_send)
        except TimeoutError:
            if not deadline.expired() or started:
                raise
            await send_error(send, ServiceError(
                503, "timeout", f"No answer within the {self.timeout_s:g} s limit; the service is "
                f"overloaded. Retry after {SETTINGS.http.retry_after_s} s or send a smaller request."))
