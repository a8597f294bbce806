"""Bad input at the door, for every JSON endpoint listed in the live /docs.json (new ones included).

Each case must answer a 4xx in the one error shape (services/errors.py): body over the documented
limit (413), invalid UTF-8, deeply nested JSON, numbers out of float range, unknown fields (rejected:
the documented policy), and never a stack trace or a server path.
"""

from __future__ import annotations

import json
import re

import pytest

LEAKS = ("Traceback", "site-packages", "/work/", "File \"")


@pytest.fixture(scope="module")
def spec(client) -> dict:
    return client.get("/docs.json").json()


def json_operations(spec: dict) -> list[tuple[str, dict]]:
    """(path, request schema) of every POST /v1/ endpoint that takes a JSON body."""
    out = []
    for path, item in spec["paths"].items():
        operation = item.get("post")
        if not path.startswith("/v1/") or operation is None:
            continue
        content = operation.get("requestBody", {}).get("content", {})
        if "application/json" in content:
            out.append((path, content["application/json"].get("schema", {})))
    return out


def assert_shaped(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.request.url, response.text[:500])
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert set(body["error"]) == {"code", "message", "field"}
    assert isinstance(body["detail"], list)
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    for leak in LEAKS:
        assert leak not in response.text
    return body


def post_raw(client, path: str, content: bytes):
    return client.post(path, content=content, headers={"content-type": "application/json"})


def test_the_document_has_json_endpoints(spec):
    paths = [path for path, _ in json_operations(spec)]
    assert "/v1/sentiment" in paths
    assert "ErrorResponse" in spec["components"]["schemas"]


def test_every_endpoint_answers_413_over_its_documented_body_limit(client, spec):
    for path, _ in json_operations(spec):
        description = spec["paths"][path]["post"]["responses"]["413"]["description"]
        limit = int(re.search(r"larger than ([\d,]+) bytes", description).group(1).replace(",", ""))
        body = b'{"text": "' + b"a" * limit + b'"}'
        result = assert_shaped(post_raw(client, path, body), 413, "body_too_large")
        assert f"{limit:,}" in result["error"]["message"]


BAD_BODIES = [
    ("invalid UTF-8", b'{"text": "caf\xe9 \xff"}', "invalid_utf8"),
    ("deeply nested", b'{"text": ' + b"[" * 64 + b"]" * 64 + b"}", "too_deeply_nested"),
    ("very deeply nested", b"[" * 100_000 + b"]" * 100_000, "too_deeply_nested"),
    ("float overflow", b'{"text": 1e999}', "number_out_of_range"),
    ("NaN", b'{"text": NaN}', "number_out_of_range"),
    ("integer past float range", b'{"text": 1' + b"0" * 400 + b"}", "number_out_of_range"),
    ("lone surrogate", b'{"text": "\\udc00"}', "invalid_unicode"),
    ("malformed JSON", b'{"text": "unterminated', "invalid_json"),
]


@pytest.mark.parametrize(("case", "body", "code"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_every_endpoint_refuses_bad_json_with_400(client, spec, case, body, code):
    for path, _ in json_operations(spec):
        assert_shaped(post_raw(client, path, body), 400, code)


def test_huge_but_allowed_json_is_validated_not_crashed(client):
    """Just under the body limit, as a list of many texts: the schema's item limit answers."""
    texts = ["fine"] * 100_000  # about 800 kB, under the 1 MiB limit
    response = client.post("/v1/sentiment", json={"texts": texts})
    body = assert_shaped(response, 400)
    assert body["error"]["field"] == "texts"


def test_unknown_fields_are_rejected_everywhere_with_their_name(client, spec):
    """Policy: unknown fields are rejected (extra="forbid"), so a typo is never silently ignored."""
    checked = 0
    for path, schema in json_operations(spec):
        if schema.get("additionalProperties") is not False:
            continue
        example = dict(schema.get("example") or {})
        example["unexpected_field"] = 1
        response = client.post(path, json=example)
        body = assert_shaped(response, 400)
        assert any(d.get("type") == "extra_forbidden" and d.get("loc") == ["unexpected_field"]
                   for d in body["detail"]), (path, body)
        checked += 1
    assert checked >= 1


def test_validation_errors_keep_pydantic_detail_and_name_the_field(client):
    response = client.post("/v1/sentiment", json={"texts": ["good", 42]})
    body = assert_shaped(response, 400, "validation_error")
    assert body["error"]["field"] == "texts[1]"
    assert body["detail"][0]["loc"] == ["texts", 1]
    assert "valid string" in body["error"]["message"]


def test_unknown_path_and_wrong_method_are_shaped(client):
    assert_shaped(client.post("/v1/no-such-endpoint", json={}), 404, "not_found")
    assert_shaped(client.get("/v1/sentiment"), 405, "method_not_allowed")


def test_wrong_content_type_is_shaped(client):
    response = client.post("/v1/sentiment", content=b'{"text": "fine"}',
                           headers={"content-type": "text/plain"})
    assert_shaped(response, 415, "unsupported_media_type")


def test_readyz_is_ready_and_docs_document_the_error_shape(client, spec):
    assert client.get("/readyz").status_code == 200
    sentiment = spec["paths"]["/v1/sentiment"]["post"]["responses"]
    ref = sentiment["400"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert spec["components"]["schemas"][ref]["required"] == ["error", "detail"]
    assert "Retry-After" in sentiment["503"]["headers"]
    assert json.dumps(spec).count("ErrorResponse") > 10


def test_unknown_paths_share_one_metrics_label(client):
    """An outside probe grew /metrics 28x with 2,000 random paths: each became an endpoint label."""
    import secrets

    paths = [f"/probe-{secrets.token_hex(6)}" for _ in range(200)] + ["/v1/probe/x", "/v1/sentiment/readyz"]
    for path in paths:
        response = client.post(path, json={})
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    metrics = client.get("/metrics").text
    assert not [path for path in paths if path in metrics]
    assert 'endpoint="/unknown"' in metrics
    assert 'endpoint="/v1/sentiment"' in metrics


def test_routes_without_fields_refuse_a_typo(client):
    for route in ("/v1/models", "/v1/forecast/spec", "/v1/caption/spec"):
        assert client.post(route, json={}).status_code == 200
        response = client.post(route, json={"verbose": True})
        assert response.status_code == 400 and response.json()["error"]["code"] == "unknown_field", route
