"""The served OpenAPI document, made to tell the truth, built once per worker.

BentoML documents 400/404/500 as ``{"error": str, "detail": str}``, keeps only the first member of
every ``anyOf`` and documents a stream as one string. ``patch_openapi`` fixes all three (the error
shape of services/errors.py, pydantic's own schemas, server-sent events) and documents the statuses
the admission middlewares answer (413 with each endpoint's body limit, 415, 429, 503, 401).
``present_openapi`` makes it rnnserve's document rather than BentoML's boilerplate: its name, version
and description, and every operation tagged by model. ``Docs`` serves the result: it is computed on
the first request and kept, so fetching the document costs nothing afterwards. It also serves the
docs page at ``/``: Swagger UI from the assets BentoML ships (``/static_content/``), with no
third-party script, font or image (BentoML's own page loads Google Tag Manager, issue 13 finding 14),
under a Content-Security-Policy that lets the browser load nothing from another origin.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import tomllib
from pathlib import Path
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


def project_version() -> str:
    """rnnserve's version: the installed distribution's, else pyproject.toml's (a plain checkout)."""
    try:
        return importlib.metadata.version("rnnserve")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        if pyproject.is_file():
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        return "unknown"


DESCRIPTION = """\
Four trained recurrent networks behind one HTTP API, each with its held-out metrics in `/v1/models`:

* **sentiment**: a bidirectional LSTM labels English texts positive or negative, in batches.
* **forecast**: a GRU forecasts TSLA's next closing prices from a window of daily bars, or bar by bar
  in a stateful session that can be exported and imported.
* **translate**: an English to Spanish GRU with attention, greedy or beam search, or streamed word by
  word as server-sent events.
* **caption**: a CNN encoder and a GRU decoder caption a PNG, JPEG or WebP image (base64 or upload).

Every endpoint takes a POST with a JSON body (the caption upload takes `multipart/form-data`), and
every endpoint shows an example body under *Try it out*. Every error has one shape, `ErrorResponse`:
`error.code`, `error.message` (what was wrong, with the limit) and `error.field`; each endpoint lists
its statuses and body limit, and SECURITY.md documents every limit. `GET /readyz` answers 200 once
every model is loaded, `GET /metrics` is Prometheus text, and this document is `GET /docs.json`."""

# In the order Swagger UI shows them.
TAGS = (
    ("sentiment", "Sentiment of English texts (bidirectional LSTM)."),
    ("forecast", "TSLA closing-price forecasts from a window of bars, and stateful sessions (GRU)."),
    ("translate", "English to Spanish translation: greedy, beam search, or streamed (GRU + attention)."),
    ("caption", "Image captioning: base64, upload or streamed (CNN encoder, GRU decoder)."),
    ("system", "Models and their metrics, readiness, liveness, Prometheus metrics and this document."),
)


def tag_for(path: str, prefix: str) -> str:
    """The model an endpoint belongs to (its path's first segment after ``prefix``), else ``system``."""
    for name, _ in TAGS[:-1]:
        if path == f"{prefix}{name}" or path.startswith(f"{prefix}{name}/"):
            return name
    return "system"


def present_openapi(spec: dict[str, Any], *, prefix: str, version: str | None = None) -> dict[str, Any]:
    """rnnserve's name, version and description in ``info``; every operation tagged by model (the
    ``TAGS`` order, then by path) in place of BentoML's one "Service APIs" group; each JSON request's
    schema example shown as the body's example. BentoML's contact, and anything else it put in
    ``info``, goes."""
    spec = copy.deepcopy(spec)
    spec["info"] = {"title": "rnnserve", "version": version or project_version(), "description": DESCRIPTION}
    spec["tags"] = [{"name": name, "description": description} for name, description in TAGS]
    order = [name for name, _ in TAGS]
    paths = spec.get("paths", {})
    for path, item in paths.items():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            operation["tags"] = [tag_for(path, prefix)]
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None and "example" not in body:
                example = body.get("schema", {}).get("example")
                if example is not None:
                    body["example"] = example
    spec["paths"] = dict(sorted(paths.items(), key=lambda entry: (order.index(tag_for(entry[0], prefix)),
                                                                  entry[0])))
    return spec


# Swagger UI from BentoML's copy of its assets, without BentoML's Google Tag Manager snippet, GitHub
# corner or the standalone layout's validator badge (an image from validator.swagger.io).
PAGE_SCRIPT_PATH = "/static_content/rnnserve-docs.js"
PAGE_HTML = f"""\
<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>rnnserve API</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css">
    <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src=".{PAGE_SCRIPT_PATH}" charset="UTF-8"></script>
  </body>
</html>
""".encode()
PAGE_SCRIPT = b"""\
window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "./docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null,
    docExpansion: "list",
    defaultModelsExpandDepth: 0,
    displayRequestDuration: true,
  });
};
"""
# The browser may load nothing from another origin, whatever the bundle holds. Swagger UI sets inline
# styles, and shows schema icons as data: images.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; object-src 'none'; "
               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class Docs:
    """Serves ``GET /docs.json`` from ``patch_openapi(service.openapi_spec)``, computed once, and the
    docs page (``GET /`` and its script)."""

    def __init__(self, app: ASGIApp, *, service: Any, prefix: str, token_paths: str, token_enabled: bool,
                 max_body_bytes: int, body_limits: dict[str, int]) -> None:
        self.app, self.service = app, service
        self.options = {"prefix": prefix, "token_paths": tuple(p.strip() for p in token_paths.split(",")
                                                               if p.strip()),
                        "token_enabled": token_enabled, "max_body_bytes": max_body_bytes,
                        "body_limits": body_limits}
        self.body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/":
            await self._answer(scope, send, PAGE_HTML, b"text/html; charset=utf-8",
                               [(b"content-security-policy", PAGE_POLICY.encode())])
        elif path == PAGE_SCRIPT_PATH:
            await self._answer(scope, send, PAGE_SCRIPT, b"text/javascript; charset=utf-8")
        elif path == "/docs.json":
            if self.body is None:
                # Through JSON first, as BentoML serves it: its dict has integer status keys.
                generated = json.loads(json.dumps(self.service.openapi_spec.asdict()))
                spec = patch_openapi(generated, service=self.service, **self.options)
                self.body = json.dumps(present_openapi(spec, prefix=self.options["prefix"])).encode()
            await self._answer(scope, send, self.body, b"application/json")
        else:
            await self.app(scope, receive, send)

    @staticmethod
    async def _answer(scope: Scope, send: Send, body: bytes, content_type: bytes,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
