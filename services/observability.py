"""Request ids and log format: an ``X-Request-ID`` on every request and response and in every log line.

- ``RequestId`` (an ASGI middleware of the entry, services/api.py): a caller's ``X-Request-ID`` is kept
  when it is 1..``max_chars`` characters of ``[A-Za-z0-9._:-]`` (``SETTINGS.http.max_request_id_chars``);
  anything else (absent, too long, other characters: it ends up in log lines, so no control or quote
  characters get there) is replaced by a generated id. The id is echoed in the response header, set in
  ``REQUEST_ID`` for the rest of the request, and written by ``RequestIdFilter`` into every log record.
  It does not depend on BentoML's tracing, which is off by default (and with it BentoML's own id).
- ``configure_logging``: every handler BentoML's worker installed gets the filter, and either a JSON
  formatter (``RNNSERVE_LOG_FORMAT=json``: one object per line) or BentoML's text format with
  `` (request_id=...)`` appended when a request is being served. Runs once per process at import.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import time
import uuid
from typing import Any, Literal

from opentelemetry import propagate
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.settings import SETTINGS

HEADER = b"x-request-id"
ID_CHARACTERS = re.compile(r"[A-Za-z0-9._:\-]+")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("rnnserve_request_id", default=None)


def accepted_id(value: bytes | None, max_chars: int) -> str | None:
    """The caller's id when it is acceptable, else None."""
    if value is None or not 0 < len(value) <= max_chars:
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if ID_CHARACTERS.fullmatch(text) else None


def _draw_id_prefix() -> None:
    global _ID_PREFIX
    _ID_PREFIX = uuid.uuid4().hex[:16]


_ID_PREFIX = ""  # 16 random hex digits per process: drawn at import and again in a forked child
_draw_id_prefix()
os.register_at_fork(after_in_child=_draw_id_prefix)
_ID_COUNTER = itertools.count()


def new_id() -> str:
    """32 hex digits, unique per request: a random prefix per process and a counter (``uuid4`` per
    request costs a system call; it showed in the entry's CPU profile, load/RESULTS.md)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


class RequestId:
    """Accepts or generates the request id, echoes it in ``X-Request-ID`` and sets ``REQUEST_ID``.

    Outermost among the entry's middlewares, so that every answer, refusals included, carries it. The
    id is not reset when the request ends: uvicorn runs each request in a task of its own, and BentoML's
    access log line (written by a middleware outside this one) must still see it.
    """

    def __init__(self, app: ASGIApp, *, max_chars: int) -> None:
        self.app, self.max_chars = app, max_chars

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = [value for name, value in scope["headers"] if name == HEADER]
        request_id = (accepted_id(given[0], self.max_chars) if len(given) == 1 else None) or new_id()
        REQUEST_ID.set(request_id)
        encoded = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, encoded)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` (after BentoML's own filter, which sets its tracing id there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, component, message, request_id (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "component": getattr(record, "component", "").strip("[]") or None,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextWithRequestId(logging.Formatter):
    """BentoML's text format, with `` (request_id=...)`` appended while a request is served."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} (request_id={request_id})" if request_id else text


class RequestIdPropagator(TextMapPropagator):
    """Puts the request's id on every call to a model service: BentoML's client injects the global
    OpenTelemetry propagator's headers into each call it makes (tracing on or off), so the model
    service's log lines carry the entry's id (``adopt_request_id`` on its side)."""

    def inject(self, carrier: Any, context: Any = None, setter: Setter = default_setter) -> None:
        if (request_id := REQUEST_ID.get()) is not None:
            setter.set(carrier, HEADER.decode(), request_id)

    def extract(self, carrier: Any, context: Any = None, getter: Getter = default_getter) -> Any:
        return context  # the id is read by adopt_request_id, not through OpenTelemetry's context

    @property
    def fields(self) -> set[str]:
        return {HEADER.decode()}


def propagate_request_ids() -> None:
    """Adds ``RequestIdPropagator`` to the global propagator, keeping what was there (idempotent)."""
    current = propagate.get_global_textmap()
    if getattr(current, "rnnserve_request_ids", False):
        return
    composite = CompositePropagator([current, RequestIdPropagator()])
    composite.rnnserve_request_ids = True
    propagate.set_global_textmap(composite)


def adopt_request_id(headers: Any, max_chars: int) -> None:
    """In a model service: the caller's (the entry's) id becomes this request's, if acceptable. Where a
    ``RequestId`` middleware already set one (the entry), it is kept."""
    if REQUEST_ID.get() is not None or (value := headers.get(HEADER.decode())) is None:
        return
    if (accepted := accepted_id(value.encode("latin-1"), max_chars)) is not None:
        REQUEST_ID.set(accepted)


def configure_logging(log_format: Literal["text", "json"]) -> list[logging.Handler]:
    """Adds the filter and the formatter to every handler of the root and ``bentoml`` loggers (those
    BentoML's worker configured before it imported the service); returns the handlers changed."""
    handlers: list[logging.Handler] = []
    for logger in (logging.getLogger(), logging.getLogger("bentoml"), logging.getLogger("uvicorn.error")):
        for handler in logger.handlers:
            if handler in handlers or any(isinstance(f, RequestIdFilter) for f in handler.filters):
                continue
            handler.addFilter(RequestIdFilter())
            handler.setFormatter(JsonFormatter() if log_format == "json"
                                 else TextWithRequestId(handler.formatter))
            handlers.append(handler)
    return handlers


configure_logging(SETTINGS.log_format)
logging.getLogger("services").setLevel(SETTINGS.log_level.upper())  # BentoML leaves the root at WARNING
propagate_request_ids()
