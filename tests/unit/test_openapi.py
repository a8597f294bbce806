"""The docs document and page are rnnserve's (issue 13, finding 14): name, version, description, one tag
per model on every operation, examples, and a page that loads nothing from another host."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re

from services.openapi import (
    PAGE_POLICY,
    PAGE_SCRIPT,
    PAGE_SCRIPT_PATH,
    TAGS,
    Docs,
    present_openapi,
    project_version,
    tag_for,
)

EXAMPLE = {"texts": ["great film"]}
BENTOML_SPEC = {
    "openapi": "3.0.2",
    "info": {"title": "rnnserve:dev", "version": "None", "contact": {"name": "BentoML Team"},
             "description": "This is a Machine Learning Service created with BentoML."},
    "tags": [{"name": "Service APIs"}, {"name": "Infrastructure"}],
    "paths": {
        "/v1/translate": {"post": {"tags": ["Service APIs"]}},
        "/metrics": {"get": {"tags": ["Infrastructure"]}},
        "/v1/caption/upload": {"post": {"tags": ["Service APIs"]}},
        "/v1/sentiment": {"post": {"tags": ["Service APIs"], "requestBody": {"content": {
            "application/json": {"schema": {"type": "object", "example": EXAMPLE}}}}}},
        "/v1/models": {"post": {"tags": ["Service APIs"]}},
        "/v1/forecast/sessions/step": {"post": {"tags": ["Service APIs"]}},
        "/v1/forecast": {"post": {"tags": ["Service APIs"]}},
        "/readyz": {"get": {"tags": ["Infrastructure"]}},
        "/v1/caption": {"post": {"tags": ["Service APIs"]}},
        "/v1/translatex": {"post": {}},
    },
}


def test_info_is_rnnservices_name_version_and_description():
    out = present_openapi(BENTOML_SPEC, prefix="/v1/")
    assert out["info"]["title"] == "rnnserve"
    assert out["info"]["version"] == importlib.metadata.version("rnnserve") == project_version()
    assert "contact" not in out["info"]
    description = out["info"]["description"]
    assert "BentoML" not in description and all(name in description for name, _ in TAGS[:-1])
    assert BENTOML_SPEC["info"]["title"] == "rnnserve:dev", "the input is not modified"


def test_every_operation_has_its_models_tag_and_paths_are_grouped_in_tag_order():
    out = present_openapi(BENTOML_SPEC, prefix="/v1/")
    assert [t["name"] for t in out["tags"]] == ["sentiment", "forecast", "translate", "caption", "system"]
    assert all(t["description"] for t in out["tags"])
    tags = {path: [op["tags"] for op in item.values()] for path, item in out["paths"].items()}
    assert tags == {
        "/v1/sentiment": [["sentiment"]],
        "/v1/forecast": [["forecast"]], "/v1/forecast/sessions/step": [["forecast"]],
        "/v1/translate": [["translate"]],
        "/v1/caption": [["caption"]], "/v1/caption/upload": [["caption"]],
        "/metrics": [["system"]], "/readyz": [["system"]], "/v1/models": [["system"]],
        "/v1/translatex": [["system"]],  # a prefix of a name is not that model
    }
    assert list(out["paths"]) == list(tags)  # in this order: by tag, then by path


def test_a_request_schema_example_becomes_the_bodys_example():
    out = present_openapi(BENTOML_SPEC, prefix="/v1/")
    body = out["paths"]["/v1/sentiment"]["post"]["requestBody"]["content"]["application/json"]
    assert body["example"] == EXAMPLE


def test_tag_for():
    assert tag_for("/v1/caption/stream", "/v1/") == "caption"
    assert tag_for("/v1/forecast", "/v1/") == "forecast"
    assert tag_for("/v1/models", "/v1/") == "system"
    assert tag_for("/healthz", "/v1/") == "system"


URL = re.compile(rb"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", re.IGNORECASE)


def serve(path: str, method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through ``Docs`` alone; a path it does not serve reaches the inner app (418)."""
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    docs = Docs(inner, service=None, prefix="/v1/", token_paths="", token_enabled=False,
                max_body_bytes=1, body_limits={})
    messages = []

    async def send(message):
        messages.append(message)

    asyncio.run(docs({"type": "http", "method": method, "path": path}, None, send))
    start, body = messages
    return start["status"], dict(start["headers"]), body["body"]


def test_the_page_is_rnnserves_and_names_no_other_host():
    status, headers, html = serve("/")
    assert status == 200 and headers[b"content-type"].startswith(b"text/html")
    assert b"<title>rnnserve API</title>" in html
    assert not URL.search(html), URL.search(html)
    assert b"googletagmanager" not in html.lower() and b"github" not in html.lower()
    for reference in re.findall(rb'(?:src|href)="([^"]+)"', html):
        assert reference.startswith(b"./static_content/"), reference
    assert headers[b"content-security-policy"] == PAGE_POLICY.encode()
    assert serve("/", "HEAD")[2] == b""


def test_the_policy_lets_the_browser_load_nothing_from_another_origin():
    directives = dict(d.strip().split(" ", 1) for d in PAGE_POLICY.split(";"))
    assert directives["default-src"] == "'self'"
    for name in ("script-src", "style-src", "img-src", "font-src", "connect-src"):
        sources = directives[name].split()
        assert set(sources) <= {"'self'", "'unsafe-inline'", "data:"}, (name, sources)
    assert "'unsafe-inline'" not in directives["script-src"]


def test_the_page_script_turns_off_the_online_validator():
    status, headers, script = serve(PAGE_SCRIPT_PATH)
    assert status == 200 and script == PAGE_SCRIPT and headers[b"content-type"].startswith(b"text/javascript")
    assert b"validatorUrl: null" in script and not URL.search(script)
    assert serve("/static_content/swagger-ui.css")[0] == 418, "BentoML's own assets pass through"
    assert serve("/", "POST")[0] == 418, "another method is left to the routes (405)"
