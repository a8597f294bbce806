"""One error type for every service, and the one place that writes it as the documented JSON shape.

Every 4xx and 5xx of the public port has this shape (``ERROR_RESPONSE_SCHEMA``, documented in
``/docs.json``; the code table is in SECURITY.md)::

    {"error": {"code": "validation_error", "message": "texts: List should have at most 64 items ...",
               "field": "texts"},
     "detail": [{"type": "too_long", "loc": ["texts"], "msg": "..."}]}

Code that finds a problem raises ``ServiceError(status, code, message, field)`` where it finds it: an
endpoint, a model service, a middleware. ``to_service_error`` maps anything else an endpoint can raise
(pydantic's validation error, a dependency that shed load or went away, a bug) onto one, and
``error_response`` / ``send_error`` write it. A model service's ``ServiceError`` crosses to the entry as
the same JSON, which ``decode_error_body`` reads back field by field, so its code reaches the client
unchanged. A 5xx never carries an exception text, a stack trace or a path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from bentoml.exceptions import BentoMLException
from starlette.responses import Response
from starlette.types import Send

from services.settings import SETTINGS

logger = logging.getLogger(__name__)

# Statuses after which a retry can succeed; they always carry Retry-After.
RETRYABLE = frozenset({429, 503, 504})
MAX_MESSAGES = 3  # validation messages joined into ``message``; all of them stay in ``detail``
CODE_BY_PYDANTIC_TYPE = {"extra_forbidden": "unknown_field", "json_invalid": "invalid_json"}
INTERNAL_MESSAGE = ("The server failed to answer this request. It was logged; if it persists, report it "
                    "with the time of the request (see SECURITY.md).")

ERROR_INFO_SCHEMA = {
    "type": "object",
    "title": "ErrorInfo",
    "required": ["code", "message", "field"],
    "properties": {
        "code": {"type": "string", "description": "Machine-readable error code (see SECURITY.md).",
                 "example": "validation_error"},
        "message": {"type": "string", "description": "What was wrong, with the limit, and how to fix it.",
                    "example": "texts: List should have at most 64 items after validation, not 65"},
        "field": {"type": "string", "nullable": True, "example": "texts",
                  "description": "The offending field as a path (rows[3].high), a header, or null."},
    },
}
ERROR_RESPONSE_SCHEMA = {
    "type": "object",
    "title": "ErrorResponse",
    "description": "The one shape of every 4xx and 5xx answer.",
    "required": ["error", "detail"],
    "properties": {
        "error": {"$ref": "#/components/schemas/ErrorInfo"},
        "detail": {"type": "array", "items": {"type": "object"},
                   "description": "Per-field validation errors (pydantic's list); empty otherwise."},
    },
}


class ServiceError(BentoMLException):
    """A refused or failed request: HTTP status, machine-readable code, message and offending field.

    A ``BentoMLException`` so that BentoML keeps its status even where the handler of
    ``services.bentoml_compat`` is not installed (``error_code`` is set per instance, so BentoML's
    exception registry is untouched).
    """

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 detail: list[Any] | None = None) -> None:
        super().__init__(message)
        self.error_code = status  # type: ignore[assignment] - BentoML reads .value or int()
        self.status, self.code, self.field, self.detail = status, code, field, detail or []

    def payload(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field},
                "detail": self.detail}

    def __repr__(self) -> str:
        return f"ServiceError({self.status}, {self.code!r}, {self.message!r}, {self.field!r})"

    # The statuses the services answer with, named for what they mean.
    @classmethod
    def unavailable(cls, message: str, code: str = "model_unavailable") -> ServiceError:
        return cls(503, code, message)

    @classmethod
    def internal(cls) -> ServiceError:
        return cls(500, "internal_error", INTERNAL_MESSAGE)


def field_path(loc: Iterable[Any]) -> str | None:
    """``["rows", 3, "high"]`` -> ``"rows[3].high"``; an empty location is the whole body (None)."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def from_validation_error(exc: Any) -> ServiceError:
    """pydantic's ``ValidationError`` -> a 400 naming the first fields, with pydantic's list as detail."""
    detail = exc.errors(include_context=False, include_input=False, include_url=False)
    first = detail[0] if detail else {}
    code = CODE_BY_PYDANTIC_TYPE.get(first.get("type", ""), "validation_error")
    messages = [f"{field_path(d.get('loc', ())) or 'body'}: {d.get('msg', '')}"
                for d in detail[:MAX_MESSAGES]]
    if len(detail) > MAX_MESSAGES:
        messages.append(f"and {len(detail) - MAX_MESSAGES} more (see detail)")
    detail = [{"type": d.get("type"), "loc": list(d.get("loc", ())), "msg": d.get("msg")} for d in detail]
    return ServiceError(400, code, "; ".join(messages), field_path(first.get("loc", ())), detail)


CODE_BY_STATUS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
                  413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request",
                  429: "too_many_requests"}


def decode_error_body(status: int, body: str) -> ServiceError | None:
    """A ``ServiceError`` written by ``encode`` (a model service's answer), read back field by field;
    None when ``body`` is not that shape."""
    try:
        error = json.loads(body)["error"]
        code, message, field = error["code"], error["message"], error["field"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(code, str) and isinstance(message, str) and (field is None or isinstance(field, str)):
        return ServiceError(status, code, message, field)
    return None


def to_service_error(exc: BaseException) -> ServiceError:
    """Whatever an endpoint raised -> the ``ServiceError`` it stands for.

    A ``BentoMLException`` is either BentoML's own (a body its parser refused: 4xx) or a model
    service's answer raised by BentoML's client with the body as its message: a ``ServiceError`` of
    that service keeps its status and code; a bare 503 or 504 (its batcher shed the request, its
    timeout passed) or a refused connection means the model service is unavailable.
    """
    import aiohttp  # BentoML's client for dependencies
    from pydantic import ValidationError

    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, BentoMLException):
        status = int(exc.error_code)
        if (decoded := decode_error_body(status, exc.message)) is not None:
            return decoded
        if status in (503, 504):
            return ServiceError.unavailable(
                f"A model service shed this request (overloaded, timed out or not loaded); retry after "
                f"{SETTINGS.http.retry_after_s} s. /readyz names the models that are not ready.")
        if 400 <= status < 500 and status not in (401, 403):
            return ServiceError(status, CODE_BY_STATUS.get(status, f"http_{status}"), exc.message[:500])
        return ServiceError.internal()
    if isinstance(exc, aiohttp.ClientError | ConnectionError | asyncio.TimeoutError):
        return ServiceError.unavailable(f"A model service did not answer (restarting or overloaded); "
                                        f"retry after {SETTINGS.http.retry_after_s} s.")
    return ServiceError.internal()


def report(exc: BaseException, method: str, path: str) -> ServiceError:
    """What an endpoint raised -> its ``ServiceError``, logged (``log_error``) and, for a 5xx, counted."""
    from services.metrics import REJECTED_REQUESTS_TOTAL

    error = to_service_error(exc)
    log_error(method, path, error, exc)
    if error.status >= 500:
        REJECTED_REQUESTS_TOTAL.labels(error.code).inc()
    return error


def encode(error: ServiceError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and headers of ``error``'s answer: JSON, and Retry-After when retrying helps."""
    body = json.dumps(error.payload()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status in RETRYABLE:
        headers.append((b"retry-after", str(SETTINGS.http.retry_after_s).encode()))
    return body, headers


def error_response(error: ServiceError) -> Response:
    """``error`` as a Starlette response (for an endpoint's handler)."""
    body, headers = encode(error)
    response = Response(body, status_code=error.status)
    response.raw_headers = headers
    return response


async def send_error(send: Send, error: ServiceError, extra_headers: list[tuple[bytes, bytes]] | None = None,
                     *, counted: bool = False) -> None:
    """``error`` as an ASGI answer (for a middleware), counted as a refusal unless ``counted`` says
    ``report`` already counted it (an endpoint's error: only 5xx are refusals there)."""
    from services.metrics import REJECTED_REQUESTS_TOTAL

    if not counted:
        REJECTED_REQUESTS_TOTAL.labels(error.code).inc()
    body, headers = encode(error)
    await send({"type": "http.response.start", "status": error.status,
                "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class ClientErrorLog:
    """Logs what clients got wrong at INFO, without a traceback, at most ``per_second`` lines a second
    per code; a server fault (5xx) at ERROR with its traceback, always.

    Everything that came from a client is quoted (``json.dumps``), so a newline in a field name
    cannot forge a log line.
    """

    def __init__(self, per_second: float = 5.0, clock: Any = time.monotonic) -> None:
        self.per_second, self.clock = per_second, clock
        self.windows: dict[str, tuple[float, int, int]] = {}  # code -> (window start, logged, dropped)

    def __call__(self, method: str, path: str, error: ServiceError, exc: BaseException | None = None) -> bool:
        where = f"{method} {json.dumps(path[:200])}"
        if error.status >= 500 and error.code == "internal_error":
            logger.error("%s: %s", where, error.code, exc_info=exc)
            return True
        now = self.clock()
        start, logged, dropped = self.windows.get(error.code, (now, 0, 0))
        if now - start >= 1.0:
            if dropped:
                logger.info("%d more %s answers in the last second were not logged", dropped, error.code)
            start, logged, dropped = now, 0, 0
        if logged >= self.per_second:
            self.windows[error.code] = (start, logged, dropped + 1)
            return False
        self.windows[error.code] = (start, logged + 1, dropped)
        level = logging.WARNING if error.status >= 500 else logging.INFO
        logger.log(level, "%s: %d %s: %s (field %s)", where, error.status, error.code,
                   json.dumps(error.message[:300]), json.dumps(error.field))
        return True


log_error = ClientErrorLog()
