"""The served OpenAPI document, made to tell the truth, built once per worker.

BentoML documents 400/404/500 as ``{"error": str, "detail": str}``, keeps only the first member of
every ``anyOf`` and documents a stream as one string. ``patch_openapi`` fixes all three (the error
shape of services/errors.py, pydantic's own schemas, server-sent events) and documents the statuses
the admission middlewares answer (413 with each endpoint's body limit, 415, 429, 503, 401).
``Docs`` serves the result: it is computed on the first request and kept, so fetching the document
costs nothing afterwards.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from services.admission import body_limit_for
from services.errors import ERROR_INFO_SCHEMA, ERROR_RESPONSE_SCHEMA

SSE_EVENT_SCHEMA = {
    "type": "object",
    "title": "ServerSentEvent",
    "description": "One server-sent event; ``data`` holds the endpoint's JSON payload as text.",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}},
}

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


class Docs:
    """Serves ``GET /docs.json`` from ``patch_openapi(service.openapi_spec)``, computed once."""

    def __init__(self, app: ASGIApp, *, service: Any, prefix: str, token_paths: str, token_enabled: bool,
                 max_body_bytes: int, body_limits: dict[str, int]) -> None:
        self.app, self.service = app, service
        self.options = {"prefix": prefix, "token_paths": tuple(p.strip() for p in token_paths.split(",")
                                                               if p.strip()),
                        "token_enabled": token_enabled, "max_body_bytes": max_body_bytes,
                        "body_limits": body_limits}
        self.body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if self.body is None:
            # Through JSON first, as BentoML serves it: its dict has integer status keys.
            generated = json.loads(json.dumps(self.service.openapi_spec.asdict()))
            spec = patch_openapi(generated, service=self.service, **self.options)
            self.body = json.dumps(spec).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]})
        await send({"type": "http.response.body", "body": self.body if scope["method"] == "GET" else b""})
