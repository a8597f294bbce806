"""What the entry service lets in, and how it says no: one error shape, request limits, overload.

Every 4xx and 5xx the entry service answers has one documented shape (``ERROR_RESPONSE_SCHEMA``)::

    {"error": {"code": "validation_error", "message": "texts: List should have at most 64 items ...",
               "field": "texts"},
     "detail": [{"type": "too_long", "loc": ["texts"], "msg": "..."}]}

``code`` is machine-readable (the table is in SECURITY.md), ``message`` is for people and names the
limit, ``field`` is the offending field as a path (``rows[3].high``) or null, and ``detail`` keeps
pydantic's per-field list for validation errors (empty otherwise). A 5xx never carries an exception
text, a stack trace or a path: only a generic message, and ``Retry-After`` when retrying helps.

Three pieces, registered in ``services/api.py``:

- ``GuardMiddleware``, a pure ASGI middleware on the entry service. Before any parsing it checks the
  optional API token, the number of requests in progress (503 + ``Retry-After`` past the bound), the
  body size (413, from ``Content-Length`` and while streaming), and for JSON bodies UTF-8, syntax,
  nesting depth and number range (400). It bounds the time to the first response byte (503
  ``timeout``), rewrites every error response into the shape above, names the models that are not
  ready on ``/readyz``, and documents all of it in the served ``/docs.json``.
- ``guard_dependencies(service)`` wraps every endpoint so that a model service that sheds load,
  times out, restarts or is down answers 503 + ``Retry-After``, never 500.
- ``tolerate_load_failures(service)`` lets a model service whose artifact is missing, truncated or
  tampered start anyway in a failed state: it logs the reason, reports not ready, and answers 503,
  while the other models keep serving.

BentoML's own ``traffic.max_concurrency`` is not used on the entry service: its 429 carries no
``Retry-After`` and is sent by a middleware outside the user's, so it could not be reshaped. The
bound here (``RNNSERVE_MAX_IN_FLIGHT``) replaces it; ``traffic.timeout`` stays as a backstop.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import hmac
import inspect
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.artifacts import ArtifactError
from services.metrics import MODEL_LOAD_FAILED, REJECTED_REQUESTS_TOTAL
from services.settings import SETTINGS

logger = logging.getLogger(__name__)

# Statuses after which a retry can succeed; they always carry Retry-After.
RETRYABLE = frozenset({429, 503, 504})
GENERIC_5XX = {
    500: ("internal_error", "The server failed to answer this request. It was logged; if it persists, "
          "report it with the time of the request (see SECURITY.md)."),
    502: ("bad_gateway", "A model service gave an invalid answer. Retry later."),
    503: ("unavailable", "A model service is overloaded, restarting or not loaded. Retry after "
          "{retry} s; /readyz names the models that are not ready."),
    504: ("timeout", "The request took longer than the {timeout:g} s limit. Retry after {retry} s, or "
          "send a smaller request."),
}
CODE_BY_STATUS = {
    400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "body_too_large", 415: "unsupported_media_type",
    422: "invalid_request", 429: "too_many_requests",
}
CODE_BY_PYDANTIC_TYPE = {"extra_forbidden": "unknown_field", "json_invalid": "invalid_json"}
MAX_MESSAGES = 3  # validation messages joined into ``message``; all of them stay in ``detail``
SYSTEM_PATHS = ("/readyz", "/livez", "/healthz", "/metrics")

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

SSE_EVENT_SCHEMA = {
    "type": "object",
    "title": "ServerSentEvent",
    "description": "One server-sent event; ``data`` holds the endpoint's JSON payload as text.",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}},
}

@dataclass(frozen=True)
class Problem:
    """One refused request: its status, code, message and offending field."""

    status: int
    code: str
    message: str
    field: str | None = None


def error_payload(code: str, message: str, field: str | None = None,
                  detail: list[Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}, "detail": detail or []}


def field_path(loc: Iterable[Any]) -> str | None:
    """``["rows", 3, "high"]`` -> ``"rows[3].high"``; an empty location is the whole body (None)."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


# Errors recorded by ``guard_dependencies`` for the middleware of the same request: BentoML answers
# every 5xx raised by an endpoint with the same generic body, so the reason travels beside it.
_REQUEST_PROBLEM: contextvars.ContextVar[dict[str, Problem] | None] = contextvars.ContextVar(
    "rnnserve_request_problem", default=None)


def _record(problem: Problem) -> None:
    holder = _REQUEST_PROBLEM.get()
    if holder is not None:
        holder["problem"] = problem


# Request body checks -----------------------------------------------------------------------------


def check_json(body: bytes, max_depth: int) -> Problem | None:
    """Refuses a JSON body that is not UTF-8, not JSON, too deeply nested or holds a number out of
    float range (1e999, NaN, Infinity, an integer past 1.8e308); None when it is acceptable.

    The schemas check everything else; this runs first so that no parser ever sees such a body.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem(400, "invalid_utf8", f"The body is not valid UTF-8 (byte {exc.start}: "
                       f"{body[exc.start:exc.start + 1]!r}); send JSON encoded as UTF-8.")
    try:
        value = json.loads(text)
    except RecursionError:
        return Problem(400, "too_deeply_nested", f"JSON nesting is deeper than the limit of {max_depth} "
                       "levels.")
    except json.JSONDecodeError as exc:
        return Problem(400, "invalid_json", f"Invalid JSON: {exc.msg} (line {exc.lineno}, column "
                       f"{exc.colno}).")
    except ValueError as exc:  # an integer literal of more than sys.int_info.default_max_str_digits
        return Problem(400, "number_out_of_range", f"Invalid JSON: {exc}. Numbers must be finite "
                       f"64-bit floats (at most {sys.float_info.max:.4g} in magnitude).")
    return check_value(value, max_depth)


def check_value(value: Any, max_depth: int) -> Problem | None:
    """Depth, finite numbers and encodable strings of a parsed JSON value; None when acceptable.

    Runs on every request, so the common case (nothing wrong) takes a fast walk that tracks only
    the depth; the walk that also builds each value's path runs only to name the offending field.
    """
    if _acceptable(value, max_depth):
        return None
    return _locate_problem(value, max_depth)


def _acceptable(value: Any, max_depth: int) -> bool:
    if type(value) not in (dict, list):
        return _locate_problem(value, max_depth) is None
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if item and depth + 1 > max_depth:  # its values would sit past the limit
            return False
        for child in (item.values() if type(item) is dict else item):
            kind = type(child)
            if kind is float:
                if not math.isfinite(child):
                    return False
            elif kind is str:
                try:
                    child.encode("utf-8")
                except UnicodeEncodeError:
                    return False
            elif kind is int:
                if abs(child) > sys.float_info.max:
                    return False
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))
    return True


def _locate_problem(value: Any, max_depth: int) -> Problem | None:
    """Walks a parsed JSON value without recursion, keeping each value's path for the message."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        item, loc = stack.pop()
        if len(loc) > max_depth:
            return Problem(400, "too_deeply_nested", f"JSON nesting is deeper than the limit of "
                           f"{max_depth} levels.", field_path(loc))
        if isinstance(item, dict):
            stack.extend((v, (*loc, k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, (*loc, i)) for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            return Problem(400, "number_out_of_range", "A number is out of float range (NaN, Infinity "
                           f"or beyond ±{sys.float_info.max:.4g}); send finite numbers.", field_path(loc))
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > sys.float_info.max:
            return Problem(400, "number_out_of_range", "An integer is beyond the float range "
                           f"(±{sys.float_info.max:.4g}).", field_path(loc))
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return Problem(400, "invalid_unicode", "A string holds an unpaired UTF-16 surrogate "
                               "escape (\\ud800-\\udfff); send valid Unicode text.", field_path(loc))
    return None


@dataclass(frozen=True)
class FormSpec:
    """The fields a multipart endpoint declares, and which of them are files."""

    fields: frozenset[str]
    file_fields: frozenset[str]
    max_text_bytes: int = SETTINGS.max_form_field_bytes

    def describe(self) -> str:
        return ", ".join(sorted(self.fields))


def form_specs(service: Any) -> dict[str, FormSpec]:
    """Route -> FormSpec of every API of ``service`` that takes a file (multipart/form-data)."""
    specs = {}
    for method in getattr(service, "apis", {}).values():
        file_fields = frozenset(getattr(method.input_spec, "multipart_fields", ()) or ())
        if file_fields:
            specs[method.route] = FormSpec(frozenset(method.input_spec.model_fields), file_fields)
    return specs


async def check_multipart(body: bytes, raw_headers: list[tuple[bytes, bytes]],
                          spec: FormSpec | None = None) -> Problem | None:
    """Refuses a multipart body that does not parse (BentoML's parser error would be a 500) and,
    given the endpoint's ``spec``, one whose fields are not what it declares: an unknown field, a
    file field sent as a text value (BentoML would fetch it as a URL), a text field sent as a file,
    a field sent twice, or a text value longer than the spec allows.
    """
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> Any:
        yield body
        yield b""

    try:
        form = await MultiPartParser(Headers(raw=raw_headers), stream()).parse()
    except MultiPartException as exc:
        return Problem(400, "invalid_multipart", f"The multipart/form-data body does not parse: {exc}",
                       None)
    except (ValueError, KeyError) as exc:  # no boundary, bad header encoding
        return Problem(400, "invalid_multipart", f"The multipart/form-data body does not parse: "
                       f"{type(exc).__name__}.", "Content-Type")
    try:
        if spec is None:
            return None
        for name in dict.fromkeys(form.keys()):
            shown = json.dumps(name)[:80]  # a client's text: quoted, so it cannot break a log line
            if name not in spec.fields:
                return Problem(400, "unknown_field", f"Unknown form field {shown}; this endpoint takes "
                               f"{spec.describe()}.", name[:80])
            values = form.getlist(name)
            if len(values) > 1:
                return Problem(400, "invalid_multipart", f"Form field {shown} was sent {len(values)} "
                               "times; send it once.", name)
            [value] = values
            if name in spec.file_fields and not isinstance(value, UploadFile):
                return Problem(400, "invalid_multipart", f"Form field {shown} must be a file part (with a "
                               "filename), not a text value; URLs are never fetched.", name)
            if name not in spec.file_fields:
                if isinstance(value, UploadFile):
                    return Problem(400, "invalid_multipart", f"Form field {shown} must be a text value, "
                                   "not a file part.", name)
                if len(value.encode()) > spec.max_text_bytes:
                    return Problem(400, "invalid_multipart", f"Form field {shown} is "
                                   f"{len(value.encode()):,} bytes; the limit for a text field is "
                                   f"{spec.max_text_bytes} bytes.", name)
        return None
    finally:
        await form.close()


def token_ok(headers: dict[bytes, bytes], token: str) -> bool:
    """True when ``Authorization: Bearer <token>`` or ``X-API-Token: <token>`` matches (constant time).

    The reusable check for state-changing endpoints; an empty configured token disables it.
    """
    if not token:
        return True
    sent = headers.get(b"x-api-token", b"")
    authorization = headers.get(b"authorization", b"")
    if authorization[:7].lower() == b"bearer ":
        sent = authorization[7:].strip()
    return hmac.compare_digest(sent, token.encode())


# Response rewriting ------------------------------------------------------------------------------


def shape_error(status: int, body: bytes, *, retry_after_s: int, timeout_s: float,
                recorded: Problem | None = None) -> dict[str, Any]:
    """Any error body the app produced -> the one documented shape.

    Understands BentoML's pydantic 400 (``{"error": "N validation error for X", "detail": [...]}``),
    its ``[{"error": "..."}]`` for other 4xx, a model service's error text forwarded inside it,
    Starlette's plain-text 404/405, and bodies that already have the shape.
    """
    if recorded is not None and recorded.status == status:
        return error_payload(recorded.code, recorded.message, recorded.field)
    try:
        parsed: Any = json.loads(body) if body else None
    except ValueError:
        parsed = body.decode("utf-8", "replace").strip() or None
    if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
        parsed = parsed[0]  # BentoML answers a 4xx BentoMLException with a one-element list
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        inner = parsed["error"].strip()
        if inner.startswith(("{", "[")):  # a model service's error body, forwarded as text
            try:
                forwarded = json.loads(inner)
            except ValueError:
                forwarded = None
            if forwarded is not None:
                return shape_error(status, inner.encode(), retry_after_s=retry_after_s,
                                   timeout_s=timeout_s)
    if status >= 500:
        code, template = GENERIC_5XX.get(status, GENERIC_5XX[500])
        if status not in GENERIC_5XX:
            code = f"http_{status}"
        return error_payload(code, template.format(retry=retry_after_s, timeout=timeout_s))
    code = CODE_BY_STATUS.get(status, f"http_{status}")
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) and "code" in parsed["error"]:
        error = parsed["error"]
        detail = parsed.get("detail")
        return error_payload(str(error["code"]), str(error.get("message", "")), error.get("field"),
                             detail if isinstance(detail, list) else [])
    if isinstance(parsed, dict) and isinstance(parsed.get("detail"), list) and parsed["detail"]:
        detail = [d for d in parsed["detail"] if isinstance(d, dict)]
        first = detail[0] if detail else {}
        code = CODE_BY_PYDANTIC_TYPE.get(first.get("type", ""), "validation_error")
        messages = [f"{field_path(d.get('loc', ())) or 'body'}: {d.get('msg', '')}"
                    for d in detail[:MAX_MESSAGES]]
        if len(detail) > MAX_MESSAGES:
            messages.append(f"and {len(detail) - MAX_MESSAGES} more (see detail)")
        return error_payload(code, "; ".join(messages), field_path(first.get("loc", ())), detail)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return error_payload(code, parsed["error"])
    if isinstance(parsed, str):
        return error_payload(code, parsed[:500])
    return error_payload(code, f"HTTP {status}")


def openapi30(schema: Any) -> Any:
    """A pydantic (JSON Schema 2020-12) schema in the OpenAPI 3.0 dialect that BentoML declares.

    ``X | None`` (``anyOf`` with ``{"type": "null"}``) becomes ``nullable: true``, a numeric
    ``exclusiveMinimum``/``exclusiveMaximum`` becomes ``minimum`` + ``exclusiveMinimum: true``, and
    ``const`` becomes a one-value ``enum``.
    """
    if isinstance(schema, list):
        return [openapi30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: openapi30(value) for key, value in schema.items()}
    for key in ("anyOf", "oneOf"):
        options = out.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [option for option in options if option != {"type": "null"}]
            del out[key]
            if len(rest) == 1 and "$ref" in rest[0]:
                out["allOf"] = rest  # OpenAPI 3.0 ignores siblings of $ref, so wrap it
            elif len(rest) == 1:
                out = {**rest[0], **out}
            else:
                out[key] = rest
            out["nullable"] = True
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = out.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[plain], out[bound] = value, True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    return out


def true_api_schemas(service: Any, spec: dict[str, Any]) -> None:
    """Replaces BentoML's flattened JSON request and response schemas with pydantic's own.

    BentoML's generator keeps only the first member of every ``anyOf`` (so ``float | None`` is
    documented as a plain number, and a null answer breaks the document) and copies numeric
    ``exclusiveMinimum`` into a 3.0 document. This regenerates them from the models.
    """
    ref_template = "#/components/schemas/{model}"
    schemas = spec["components"]["schemas"]
    for method in service.apis.values():
        operation = spec.get("paths", {}).get(method.route, {}).get("post")
        if operation is None:
            continue
        body = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            generated = method.input_spec.model_json_schema(ref_template=ref_template)
            schemas.update({k: openapi30(v) for k, v in generated.pop("$defs", {}).items()})
            body["schema"] = {**openapi30(generated), "title": body.get("schema", {}).get("title")}
        answer = operation.get("responses", {}).get("200", {}).get("content", {}).get("application/json")
        if answer is not None and not method.is_stream:
            generated = method.output_spec.model_json_schema(ref_template=ref_template, mode="serialization")
            schemas.update({k: openapi30(v) for k, v in generated.pop("$defs", {}).items()})
            answer["schema"] = openapi30(generated)


def patch_openapi(spec: dict[str, Any], *, prefix: str, token_paths: tuple[str, ...],
                  token_enabled: bool, max_body_bytes: int, body_limits: dict[str, int],
                  service: Any = None) -> dict[str, Any]:
    """Makes the served OpenAPI document tell the truth.

    BentoML documents 400/404/500 as ``{"error": str, "detail": str}``; they are ErrorResponse here,
    and every API path also documents 413 (with its body limit), 415, 429, 503 (with Retry-After) and,
    for token-protected paths, 401. Streams are documented as events, and with ``service`` the JSON
    request and response schemas are pydantic's own (``true_api_schemas``).
    """
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    if service is not None:
        true_api_schemas(service, spec)
    schemas["ErrorInfo"] = ERROR_INFO_SCHEMA
    schemas["ErrorResponse"] = ERROR_RESPONSE_SCHEMA
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        if name in schemas:
            schemas[name] = {**ERROR_RESPONSE_SCHEMA, "title": name,
                             "description": schemas[name].get("description", "")}

    def response(description: str, retry: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"description": description, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        if retry:
            out["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                              "schema": {"type": "integer"}}}
        return out

    for path, item in spec.get("paths", {}).items():
        if not path.startswith(prefix):
            continue
        for method, operation in item.items():
            if method != "post" or not isinstance(operation, dict):
                continue
            for answer in operation.get("responses", {}).values():
                # BentoML documents a stream as one string; a client (and schemathesis) sees events.
                if isinstance(answer, dict) and "text/event-stream" in answer.get("content", {}):
                    answer["content"]["text/event-stream"]["schema"] = SSE_EVENT_SCHEMA
            limit = body_limit_for(path, max_body_bytes, body_limits)
            responses = operation.setdefault("responses", {})
            responses.setdefault("400", response("Invalid request: see error.code and error.field."))
            responses["413"] = response(f"The body is larger than {limit:,} bytes.")
            responses["415"] = response("The Content-Type is not the one this endpoint takes.")
            responses["429"] = response("Too many requests or sessions; retry later.", retry=True)
            responses["503"] = response("Overloaded, timed out, or a model is not ready.", retry=True)
            if path.startswith(token_paths):
                responses["401"] = response("API token missing or wrong." if token_enabled else
                                            "API token missing or wrong (when RNNSERVE_API_TOKEN is set).")
    return spec


def body_limit_for(path: str, default: int, body_limits: dict[str, int]) -> int:
    """The body limit of the longest matching path prefix in ``body_limits``, else ``default``."""
    matches = [prefix for prefix in body_limits if path.startswith(prefix)]
    return body_limits[max(matches, key=len)] if matches else default


# The middleware ----------------------------------------------------------------------------------


class GuardMiddleware:
    """Limits, token, overload and timeout checks, and the one error shape (module docstring)."""

    def __init__(self, app: ASGIApp, *, service: Any = None, prefix: str = "/v1/",
                 max_body_bytes: int | None = None, body_limits: dict[str, int] | None = None,
                 max_json_depth: int | None = None, max_in_flight: int | None = None,
                 timeout_s: float | None = None, retry_after_s: int | None = None,
                 api_token: str | None = None, token_paths: Iterable[str] | None = None) -> None:
        self.app = app
        self.service = service
        self.prefix = prefix
        self.max_body_bytes = max_body_bytes or SETTINGS.max_body_bytes
        self.body_limits = dict(body_limits or {})
        self.max_json_depth = max_json_depth or SETTINGS.max_json_depth
        self.max_in_flight = max_in_flight or SETTINGS.max_in_flight
        # Just under BentoML's traffic.timeout, so that this shaped 503 answers before its bare 504.
        self.timeout_s = timeout_s or max(SETTINGS.timeout_s - 0.5, SETTINGS.timeout_s * 0.5)
        self.retry_after_s = retry_after_s or SETTINGS.retry_after_s
        self.api_token = SETTINGS.api_token if api_token is None else api_token
        paths = SETTINGS.api_token_paths.split(",") if token_paths is None else token_paths
        self.token_paths = tuple(p.strip() for p in paths if p.strip())
        self.in_flight = 0
        self.forms = form_specs(service)

    # Sending -------------------------------------------------------------------------------------

    async def _send_json(self, send: Send, status: int, payload: Any,
                         extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status in RETRYABLE:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        headers += extra_headers or []
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _refuse(self, send: Send, problem: Problem,
                      extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        REJECTED_REQUESTS_TOTAL.labels(problem.code).inc()
        await self._send_json(send, problem.status, error_payload(problem.code, problem.message,
                                                                  problem.field), extra_headers)

    # Request side --------------------------------------------------------------------------------

    def _admission(self, scope: Scope, headers: dict[bytes, bytes]) -> Problem | None:
        path = scope["path"]
        if self.api_token and path.startswith(self.token_paths) and not token_ok(headers, self.api_token):
            return Problem(401, "unauthorized", "This endpoint changes state and needs the API token: "
                           "send 'Authorization: Bearer <token>'.", "Authorization")
        if self.in_flight >= self.max_in_flight:
            return Problem(503, "overloaded", f"{self.in_flight} requests are in progress; the limit is "
                           f"{self.max_in_flight} (RNNSERVE_MAX_IN_FLIGHT). Retry after "
                           f"{self.retry_after_s} s.")
        limit = body_limit_for(path, self.max_body_bytes, self.body_limits)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return Problem(400, "invalid_request", "Content-Length is not an integer.", "Content-Length")
            if declared > limit:
                return self._too_large(limit, declared)
        return None

    @staticmethod
    def _too_large(limit: int, size: int | None = None) -> Problem:
        seen = f"{size:,} bytes" if size is not None else "more"
        return Problem(413, "body_too_large", f"The body is {seen}; the limit for this endpoint is "
                       f"{limit:,} bytes.", None)

    async def _read_body(self, receive: Receive, limit: int) -> tuple[bytes, list[Message], bool]:
        """Reads the whole body, counting as it streams; stops as soon as it passes ``limit``."""
        chunks, messages, size = [], [], 0
        while True:
            message = await receive()
            messages = [message]  # only the last one matters: it may say the client went away
            if message["type"] != "http.request":
                return b"".join(chunks), messages, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", messages, True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), messages, False

    # The call ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.endswith("/docs.json") and scope["method"] == "GET":
            await self._docs(scope, receive, send)
            return
        if path.endswith("/readyz"):
            await self._readyz(scope, receive, send)
            return
        if path in SYSTEM_PATHS:
            await self.app(scope, receive, send)
            return
        guarded = scope["method"] == "POST" and path.startswith(self.prefix)
        if not guarded:
            await self._call_shaped(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if (problem := self._admission(scope, headers)) is not None:
            extra = [(b"www-authenticate", b"Bearer")] if problem.status == 401 else None
            await self._refuse(send, problem, extra)
            return
        self.in_flight += 1
        try:
            limit = body_limit_for(path, self.max_body_bytes, self.body_limits)
            body, messages, too_large = await self._read_body(receive, limit)
            if too_large:
                await self._refuse(send, self._too_large(limit))
                return
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            problem = None
            if content_type == b"application/json" and body:
                problem = check_json(body, self.max_json_depth)
            elif content_type == b"multipart/form-data":
                problem = await check_multipart(body, scope["headers"], self.forms.get(path))
            if problem is not None:
                await self._refuse(send, problem)
                return
            await self._call_shaped(scope, _replay(body, messages, receive), send, deadline=True)
        finally:
            self.in_flight -= 1

    async def _call_shaped(self, scope: Scope, receive: Receive, send: Send,
                           deadline: bool = False) -> None:
        holder: dict[str, Problem] = {}
        token = _REQUEST_PROBLEM.set(holder)
        started = asyncio.Event()
        pending: dict[str, Any] = {}

        async def shaping_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.set()
                if (deadline_cm := pending.pop("deadline", None)) is not None:
                    deadline_cm.reschedule(None)  # answered in time: the rest may stream at leisure
                if message["status"] < 400:
                    await send(message)
                    return
                pending["start"], pending["body"] = message, []
                return
            if message["type"] == "http.response.body" and "start" in pending:
                pending["body"].append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start = pending.pop("start")
                status = start["status"]
                payload = shape_error(status, b"".join(pending.pop("body")), retry_after_s=self.retry_after_s,
                                      timeout_s=self.timeout_s, recorded=holder.get("problem"))
                if status >= 500:
                    REJECTED_REQUESTS_TOTAL.labels(payload["error"]["code"]).inc()
                kept = [(k, v) for k, v in start.get("headers", [])
                        if k.lower() not in (b"content-length", b"content-type", b"retry-after")]
                await self._send_json(send, status, payload, kept)
                return
            await send(message)

        try:
            if not deadline:
                await self._unexpected(scope, receive, shaping_send, started)
                return
            # The deadline cancels this task if no response has started by then (asyncio.timeout, so
            # no extra task per request); the first byte of the answer lifts it.
            deadline_cm = pending["deadline"] = asyncio.timeout(self.timeout_s)
            try:
                async with deadline_cm:
                    await self._unexpected(scope, receive, shaping_send, started)
            except TimeoutError:
                if not deadline_cm.expired() or started.is_set():
                    raise
                await self._refuse(send, Problem(503, "timeout", f"No answer within the {self.timeout_s:g} s "
                                                 f"limit; the service is overloaded. Retry after "
                                                 f"{self.retry_after_s} s or send a smaller request."))
        finally:
            _REQUEST_PROBLEM.reset(token)

    async def _unexpected(self, scope: Scope, receive: Receive, send: Send, started: asyncio.Event) -> None:
        """Runs the app; an exception that escapes it becomes a shaped 500 (if nothing was sent yet)."""
        try:
            await self.app(scope, receive, send)
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if started.is_set():
                raise
            await self._refuse(send, Problem(500, *GENERIC_5XX[500]))

    # Documents and probes ------------------------------------------------------------------------

    async def _docs(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, chunks, capture = _response_capture()
        await self.app(scope, receive, capture)
        status = start.get("status", 500)
        if status != 200:
            payload = shape_error(status, b"".join(chunks), retry_after_s=self.retry_after_s,
                                  timeout_s=self.timeout_s)
            await self._send_json(send, status, payload)
            return
        spec = patch_openapi(json.loads(b"".join(chunks)), prefix=self.prefix, token_paths=self.token_paths,
                             token_enabled=bool(self.api_token), max_body_bytes=self.max_body_bytes,
                             body_limits=self.body_limits, service=self.service)
        await self._send_json(send, 200, spec)

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, chunks, capture = _response_capture()
        try:
            await self.app(scope, receive, capture)
        except Exception as exc:  # BentoML's probe raises when a dependency refuses connections
            logger.warning("readiness probe failed: %s: %s", type(exc).__name__, exc)
            start = {"status": 503}
        status = start.get("status", 500)
        if status == 200:
            await send(start)
            await send({"type": "http.response.body", "body": b"".join(chunks)})
            return
        readiness = await dependency_readiness(self.service)
        names = [name for name, ready in readiness.items() if not ready]
        message = (f"Not ready: {', '.join(names)} (its model failed to load, or it is starting or "
                   "restarting; the log says which)." if names else "Not ready: the entry service is "
                   "starting.")
        detail = [{"service": name, "ready": ready} for name, ready in readiness.items()]
        await self._send_json(send, 503, error_payload("not_ready", message, None, detail))


def _response_capture() -> tuple[dict[str, Any], list[bytes], Send]:
    """A ``send`` that keeps the response start message and body chunks instead of sending them."""
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def capture(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    return start, chunks, capture


def _replay(body: bytes, messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body over once, then defers to the client."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if messages and messages[-1]["type"] != "http.request":
                return messages[-1]  # the client went away while sending
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def dependency_readiness(service: Any, timeout_s: float = 2.0) -> dict[str, bool]:
    """Each model this worker runs (services/inprocess.py) -> whether it loaded, and each dependency
    (model service) of ``service`` -> whether its /readyz answers 200."""
    from services.bentoml_compat import resolved_client
    from services.inprocess import REGISTRY

    local = {name: model.ready for name, model in REGISTRY.items()}
    if service is None:
        return local
    names, checks = [], []
    for name, dependency in service.dependencies.items():
        proxy = resolved_client(dependency)  # the client the running service already uses, if any
        if proxy is None or not hasattr(proxy, "is_ready"):
            continue
        names.append(dependency.on.name if dependency.on is not None else name)
        checks.append(_is_ready(proxy, timeout_s))
    return {**local, **dict(zip(names, await asyncio.gather(*checks), strict=True))}


async def _is_ready(proxy: Any, timeout_s: float) -> bool:
    try:
        return bool(await asyncio.wait_for(proxy.is_ready(max(1, int(timeout_s))), timeout_s + 1))
    except Exception:  # connection refused while a worker restarts, timeouts, ...
        return False


# Dependency failures -----------------------------------------------------------------------------


def _dependency_failure(exc: BaseException) -> Problem | None:
    """The 503 a dependency failure maps to, or None when ``exc`` is not one."""
    import aiohttp  # BentoML's client for dependencies

    # 429 is left alone: an endpoint's own "too many sessions" must stay a 429, and no model service
    # sets BentoML's max_concurrency, so a dependency never answers one.
    if isinstance(exc, BentoMLException) and int(exc.error_code) in (503, 504):
        return Problem(503, "model_unavailable", "A model service shed this request (overloaded, "
                       f"timed out or not loaded); retry after {SETTINGS.retry_after_s} s. /readyz "
                       "names the models that are not ready.")
    if isinstance(exc, aiohttp.ClientError | ConnectionError | asyncio.TimeoutError):
        return Problem(503, "model_unavailable", "A model service did not answer (restarting or "
                       f"overloaded); retry after {SETTINGS.retry_after_s} s.")
    return None


def guard_dependencies(service: Any) -> Any:
    """Wraps every non-streaming endpoint of ``service`` so dependency failures answer 503.

    A model service that sheds load (503), times out, restarts after a crash (connection refused or
    reset) or is not loaded surfaces in the entry as a BentoMLException or an aiohttp error; BentoML
    would answer most of them with a bare 500. A streaming endpoint is guarded until its first
    event (BentoML sends the status with it); a failure after that ends the stream.
    """
    for method in service.apis.values():
        func = method.func
        if getattr(func, "__rnnserve_guarded__", False):
            continue
        if inspect.isasyncgenfunction(func):
            method.func = _guard_stream(func)
            continue
        if not inspect.iscoroutinefunction(func):
            continue

        def make(func: Any) -> Any:
            @functools.wraps(func)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await func(*args, **kwargs)
                except Exception as exc:
                    if (problem := _dependency_failure(exc)) is None:
                        raise
                    logger.warning("dependency failure in %s: %s: %s", func.__name__,
                                   type(exc).__name__, str(exc)[:200])
                    _record(problem)
                    raise ServiceUnavailable(problem.message) from exc

            guarded.__rnnserve_guarded__ = True  # type: ignore[attr-defined]
            return guarded

        method.func = make(func)
    return service


def _guard_stream(func: Any) -> Any:
    """A stream whose dependency fails before its first event answers 503, like any endpoint.

    BentoML reads the first event before it sends the status, so only a failure before it can still
    change the answer; a failure later ends the stream.
    """
    @functools.wraps(func)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        started = False
        try:
            async for item in func(*args, **kwargs):
                started = True
                yield item
        except Exception as exc:
            if started or (problem := _dependency_failure(exc)) is None:
                raise
            logger.warning("dependency failure in %s: %s: %s", func.__name__, type(exc).__name__,
                           str(exc)[:200])
            _record(problem)
            raise ServiceUnavailable(problem.message) from exc

    guarded.__rnnserve_guarded__ = True  # type: ignore[attr-defined]
    return guarded


# Artifact failures -------------------------------------------------------------------------------

LOAD_ERROR = "__rnnserve_load_error__"


def tolerate_load_failures(service: Any) -> Any:
    """Lets each model service (dependency) of ``service`` start when its artifact is bad.

    When ``__init__`` raises ``ArtifactError`` (the model file is missing, truncated or does not
    match the checksum recorded in the model store), the service logs the reason at ERROR, sets
    ``rnnserve_model_load_failed{model}`` to 1, reports not ready, and answers every call with 503.
    Without this, the worker would exit and BentoML would restart it in a loop while the entry
    stayed not ready for every model. A model missing from the store altogether still stops
    ``bentoml serve`` at start: BentoML resolves model tags when it loads the service.
    """
    for dependency in service.dependencies.values():
        if dependency.on is not None:
            _tolerate(dependency.on)
    return service


def _tolerate(svc: Any) -> None:
    inner = svc.inner
    if getattr(inner, "__rnnserve_tolerant__", False):
        return
    name = svc.name
    original_init = inner.__init__
    original_ready = getattr(inner, "__is_ready__", None)

    @functools.wraps(original_init)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            original_init(self, *args, **kwargs)
        except ArtifactError as exc:
            setattr(self, LOAD_ERROR, str(exc))
            MODEL_LOAD_FAILED.labels(name).set(1)
            logger.error("MODEL NOT LOADED: %s: %s. The %s service stays up in a failed state: /readyz "
                         "is not ready and its endpoints answer 503; the other models keep serving. "
                         "Re-register a good artifact and restart. (%.2f s)", name, str(exc).rstrip("."),
                         name, time.perf_counter() - started)
        else:
            MODEL_LOAD_FAILED.labels(name).set(0)

    def is_ready(self: Any) -> bool:
        if getattr(self, LOAD_ERROR, None) is not None:
            return False
        return True if original_ready is None else original_ready(self)

    inner.__init__ = init
    inner.__is_ready__ = is_ready
    inner.__rnnserve_tolerant__ = True
    for method in svc.apis.values():
        method.func = _refuse_when_not_loaded(method.func, name)


def _refuse_when_not_loaded(func: Any, name: str) -> Any:
    def check(self: Any) -> None:
        if (error := getattr(self, LOAD_ERROR, None)) is not None:
            raise ServiceUnavailable(f"model {name} is not loaded: {error}")

    if inspect.isasyncgenfunction(func):
        @functools.wraps(func)
        async def agen(self: Any, *args: Any, **kwargs: Any) -> Any:
            check(self)
            async for item in func(self, *args, **kwargs):
                yield item
        return agen
    if inspect.isgeneratorfunction(func):
        @functools.wraps(func)
        def gen(self: Any, *args: Any, **kwargs: Any) -> Any:
            check(self)
            yield from func(self, *args, **kwargs)
        return gen
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def coro(self: Any, *args: Any, **kwargs: Any) -> Any:
            check(self)
            return await func(self, *args, **kwargs)
        return coro

    @functools.wraps(func)
    def plain(self: Any, *args: Any, **kwargs: Any) -> Any:
        check(self)
        return func(self, *args, **kwargs)
    return plain


# Shutdown order -----------------------------------------------------------------------------------


def stop_dependencies_after_entry(service: Any, max_wait_s: float | None = None) -> Any:
    """On SIGTERM, model services keep serving until the entry worker has finished, then stop.

    BentoML's arbiter (circus) sends SIGTERM to every worker at once. The entry worker then finishes
    its requests in flight (uvicorn's graceful shutdown), but those still need their model service,
    which would already have closed its socket: they failed with a broken pipe. With this, a model
    service worker defers its SIGTERM until no entry worker (``service.name``) is left under the same
    arbiter, or ``max_wait_s`` (default RNNSERVE_TIMEOUT_S + 5 s) has passed, and then shuts down
    gracefully as before. Kubernetes' terminationGracePeriodSeconds must exceed that.
    """
    wait_s = max_wait_s if max_wait_s is not None else SETTINGS.timeout_s + 5.0
    for dependency in service.dependencies.values():
        if dependency.on is None or getattr(dependency.on.inner, "__rnnserve_drains_last__", False):
            continue
        inner = dependency.on.inner
        original_init = inner.__init__

        def make(original_init: Any) -> Any:
            @functools.wraps(original_init)
            def init(self: Any, *args: Any, **kwargs: Any) -> None:
                original_init(self, *args, **kwargs)
                defer_sigterm(service.name, wait_s)

            return init

        inner.__init__ = make(original_init)
        inner.__rnnserve_drains_last__ = True
    return service


def defer_sigterm(entry_name: str, wait_s: float) -> bool:
    """Wraps this process's SIGTERM handler (uvicorn's) so that it runs once the entry is gone."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return False

    def deferred(signum: int, frame: Any) -> None:
        def later() -> None:
            started = time.monotonic()
            while time.monotonic() - started < wait_s and entry_alive(entry_name):
                time.sleep(0.1)
            logger.info("SIGTERM: the entry service has stopped (%.1f s); shutting down gracefully",
                        time.monotonic() - started)
            previous(signum, None)

        threading.Thread(target=later, name="rnnserve-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, deferred)
    return True


def entry_alive(entry_name: str) -> bool:
    """Whether a worker of the entry service still runs under this process's parent (the arbiter)."""
    try:
        siblings = psutil.Process().parent().children()
    except (psutil.Error, AttributeError):
        return False
    for process in siblings:
        try:
            args = process.cmdline()
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if "--service-name" in args and args[args.index("--service-name") + 1] == entry_name:
            return True
    return False
