"""The entry service's guard (services/errors.py) on a fake ASGI app: no server, no model."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from starlette.types import Receive, Scope, Send

from services.artifacts import ArtifactError
from services.errors import (
    GuardMiddleware,
    _dependency_failure,
    _refuse_when_not_loaded,
    check_json,
    field_path,
    patch_openapi,
    shape_error,
    token_ok,
)

PYDANTIC_400 = {
    "error": "1 validation error for SentimentRequestIODescriptor",
    "detail": [{"type": "too_long", "loc": ["texts"], "msg": "List should have at most 64 items"}],
}


async def fake_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers like BentoML would: by path, after reading the whole body."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    status, payload = 200, body or b"{}"
    if path == "/v1/pydantic":
        status, payload = 400, json.dumps(PYDANTIC_400).encode()
    elif path == "/v1/bento4xx":
        status, payload = 404, json.dumps([{"error": "session abc is unknown"}]).encode()
    elif path == "/v1/crash":
        status, payload = 500, b'{"error": "Traceback: /work/main/services/x.py line 3 KeyError"}'
    elif path == "/v1/plain":
        status, payload = 405, b"Method Not Allowed"
    elif path == "/v1/slow":
        await asyncio.sleep(30)
    elif path == "/v1/slow-stream":  # answers at once, then takes longer than the deadline to finish
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first ", "more_body": True})
        await asyncio.sleep(1.0)
        await send({"type": "http.response.body", "body": b"last"})
        return
    elif path == "/docs.json":
        payload = json.dumps({"paths": {"/v1/forecast/sessions": {"post": {"responses": {}}},
                                        "/v1/caption": {"post": {"responses": {}}}},
                              "components": {"schemas": {"InvalidArgument": {"description": "Bad"}}},
                              }).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"42")]})
    await send({"type": "http.response.body", "body": payload})


def guard(**kwargs) -> GuardMiddleware:
    options = {"max_body_bytes": 1000, "max_json_depth": 8, "max_in_flight": 4, "timeout_s": 5.0,
               "retry_after_s": 2, "api_token": "", "token_paths": ["/v1/forecast/sessions"]}
    return GuardMiddleware(fake_app, **{**options, **kwargs})


def run(app: GuardMiddleware, *requests: dict) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return list(await asyncio.gather(*(client.request(**r) for r in requests)))

    return asyncio.run(go())


def post(path: str, content: bytes | None = None, json_body=None, headers=None) -> dict:
    headers = {"content-type": "application/json", **(headers or {})}
    if json_body is not None:
        content = json.dumps(json_body).encode()
    return {"method": "POST", "url": path, "content": content, "headers": headers}


def assert_shape(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code, body
    assert isinstance(body["detail"], list)
    return body


def test_valid_json_reaches_the_app_unchanged():
    [response] = run(guard(), post("/v1/echo", json_body={"text": "fine", "n": [1, 2.5]}))
    assert response.status_code == 200
    assert response.json() == {"text": "fine", "n": [1, 2.5]}


BAD_BODIES = [
    ("invalid utf-8", b'{"text": "\xff\xfe"}', "invalid_utf8", None),
    ("syntax error", b'{"text": "unterminated', "invalid_json", None),
    ("too deep", json.dumps({"a": [[[[[[[[[1]]]]]]]]]}).encode(), "too_deeply_nested", "a" + "[0]" * 8),
    ("recursion", b"[" * 50000 + b"]" * 50000, "too_deeply_nested", None),
    ("overflowing float", b'{"rows": [{"close": 1e999}]}', "number_out_of_range", "rows[0].close"),
    ("NaN", b'{"x": NaN}', "number_out_of_range", "x"),
    ("-Infinity", b'{"x": [-Infinity]}', "number_out_of_range", "x[0]"),
    ("integer beyond float", b'{"x": ' + b"9" * 400 + b"}", "number_out_of_range", "x"),
    ("lone surrogate", b'{"text": "\\ud800"}', "invalid_unicode", "text"),
]


@pytest.mark.parametrize(("case", "body", "code", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_json_bodies_get_400_with_code_and_field(case, body, code, field):
    app = guard(max_body_bytes=1 << 20)
    [response] = run(app, post("/v1/echo", body))
    result = assert_shape(response, 400, code)
    assert result["error"]["field"] == field
    assert "Invalid JSON" in result["error"]["message"] or code != "invalid_json"


def test_huge_integer_literal_is_refused_not_crashed():
    assert check_json(b'{"x": ' + b"9" * 5000 + b"}", 8).code == "number_out_of_range"


def test_body_over_the_limit_is_413_from_content_length_and_from_the_stream():
    app = guard()
    [declared] = run(app, post("/v1/echo", b"{" + b" " * 2000 + b"}"))
    body = assert_shape(declared, 413, "body_too_large")
    assert "1,000 bytes" in body["error"]["message"]

    async def chunks():
        for _ in range(20):
            yield b" " * 100

    [streamed] = run(app, {"method": "POST", "url": "/v1/echo", "content": chunks(),
                           "headers": {"content-type": "application/json"}})
    assert_shape(streamed, 413, "body_too_large")
    assert app.in_flight == 0


def test_body_limit_follows_the_longest_matching_prefix():
    app = guard(body_limits={"/v1/caption": 5000})
    ok, refused = run(app, post("/v1/caption", json_body={"image": "a" * 3000}),
                      post("/v1/echo", json_body={"image": "a" * 3000}))
    assert ok.status_code == 200
    assert_shape(refused, 413, "body_too_large")


def test_pydantic_400_keeps_detail_and_names_the_field():
    [response] = run(guard(), post("/v1/pydantic", json_body={}))
    body = assert_shape(response, 400, "validation_error")
    assert body["error"]["field"] == "texts"
    assert "at most 64 items" in body["error"]["message"]
    assert body["detail"] == PYDANTIC_400["detail"]


def test_bentoml_list_body_and_plain_text_errors_are_shaped():
    listed, plain = run(guard(), post("/v1/bento4xx", json_body={}), post("/v1/plain", json_body={}))
    assert assert_shape(listed, 404, "not_found")["error"]["message"] == "session abc is unknown"
    assert assert_shape(plain, 405, "method_not_allowed")["error"]["message"] == "Method Not Allowed"
    assert listed.headers["x-request-id"] == "42"


def test_5xx_never_leaks_the_exception_text():
    [response] = run(guard(), post("/v1/crash", json_body={}))
    body = assert_shape(response, 500, "internal_error")
    assert "Traceback" not in response.text and "/work" not in response.text
    assert body["detail"] == []


def test_forwarded_model_service_error_is_unwrapped():
    inner = json.dumps(PYDANTIC_400)
    shaped = shape_error(400, json.dumps([{"error": inner}]).encode(), retry_after_s=1, timeout_s=1)
    assert shaped["error"]["code"] == "validation_error"
    assert shaped["detail"] == PYDANTIC_400["detail"]


def test_503_has_retry_after_and_a_generic_message():
    shaped = shape_error(503, b'{"error": "An unexpected error has occurred"}', retry_after_s=3, timeout_s=9)
    assert shaped["error"]["code"] == "unavailable"
    assert "3 s" in shaped["error"]["message"]


def test_requests_past_max_in_flight_get_503_with_retry_after():
    app = guard(max_in_flight=2, timeout_s=0.5)
    responses = run(app, *(post("/v1/slow", json_body={}) for _ in range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [503] * 5
    codes = sorted(r.json()["error"]["code"] for r in responses)
    assert codes == ["overloaded"] * 3 + ["timeout"] * 2
    assert all(r.headers["retry-after"] == "2" for r in responses)
    assert app.in_flight == 0


def test_the_deadline_is_lifted_once_the_answer_has_started():
    [response] = run(guard(timeout_s=0.3), post("/v1/slow-stream", json_body={}))
    assert response.status_code == 200
    assert response.content == b"first last"


def test_token_protects_only_the_configured_paths():
    app = guard(api_token="s3cret")
    missing, wrong, bearer, header, other = run(
        app,
        post("/v1/forecast/sessions", json_body={}),
        post("/v1/forecast/sessions/delete", json_body={}, headers={"authorization": "Bearer nope"}),
        post("/v1/forecast/sessions", json_body={}, headers={"authorization": "Bearer s3cret"}),
        post("/v1/forecast/sessions/delete", json_body={}, headers={"x-api-token": "s3cret"}),
        post("/v1/echo", json_body={}),
    )
    assert assert_shape(missing, 401, "unauthorized")["error"]["field"] == "Authorization"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_shape(wrong, 401, "unauthorized")
    assert bearer.status_code == header.status_code == other.status_code == 200


def test_token_ok_is_disabled_by_an_empty_token():
    assert token_ok({}, "")
    assert not token_ok({}, "x")
    assert token_ok({b"authorization": b"bearer x"}, "x")


def test_docs_json_documents_the_error_shape_and_statuses():
    [response] = run(guard(api_token="t", body_limits={"/v1/caption": 5000}),
                     {"method": "GET", "url": "/docs.json"})
    spec = response.json()
    assert spec["components"]["schemas"]["InvalidArgument"]["required"] == ["error", "detail"]
    sessions = spec["paths"]["/v1/forecast/sessions"]["post"]["responses"]
    assert {"400", "401", "413", "415", "429", "503"} <= set(sessions)
    assert "Retry-After" in sessions["503"]["headers"]
    assert "5,000 bytes" in spec["paths"]["/v1/caption"]["post"]["responses"]["413"]["description"]
    assert "401" not in spec["paths"]["/v1/caption"]["post"]["responses"]


def test_patch_openapi_leaves_other_paths_alone():
    spec = {"paths": {"/readyz": {"get": {"responses": {"200": {}}}}}}
    assert patch_openapi(spec, prefix="/v1/", token_paths=(), token_enabled=False, max_body_bytes=1,
                         body_limits={}) == {**spec, "components": patch_openapi(
                             spec, prefix="/v1/", token_paths=(), token_enabled=False,
                             max_body_bytes=1, body_limits={})["components"]}


def test_field_path():
    assert field_path(["rows", 3, "high"]) == "rows[3].high"
    assert field_path([]) is None
    assert field_path([0, "x"]) == "[0].x"


def test_dependency_failures_map_to_503_and_bugs_do_not():
    import aiohttp

    assert _dependency_failure(ServiceUnavailable("shed")).status == 503
    assert _dependency_failure(BentoMLException("slow", error_code=504)).code == "model_unavailable"
    assert _dependency_failure(BentoMLException("too many sessions", error_code=429)) is None
    assert _dependency_failure(aiohttp.ServerDisconnectedError()).status == 503
    assert _dependency_failure(TimeoutError()).status == 503
    assert _dependency_failure(BentoMLException("bug")) is None
    assert _dependency_failure(KeyError("x")) is None


def test_a_service_that_failed_to_load_refuses_every_kind_of_call():
    class Broken:
        __rnnserve_load_error__ = "model.pt: sha256 mismatch"

    def plain(self, x):
        return x

    async def coro(self, x):
        return x

    async def agen(self, x):
        yield x

    with pytest.raises(ServiceUnavailable, match="sha256 mismatch"):
        _refuse_when_not_loaded(plain, "m")(Broken(), 1)
    with pytest.raises(ServiceUnavailable):
        asyncio.run(_refuse_when_not_loaded(coro, "m")(Broken(), 1))

    async def consume():
        return [x async for x in _refuse_when_not_loaded(agen, "m")(Broken(), 1)]

    with pytest.raises(ServiceUnavailable):
        asyncio.run(consume())

    class Fine:
        pass

    assert _refuse_when_not_loaded(plain, "m")(Fine(), 7) == 7
    assert issubclass(ArtifactError, RuntimeError)


def test_an_exception_escaping_the_app_is_a_shaped_500():
    async def broken(scope, receive, send):
        raise RuntimeError("/secret/path exploded")

    app = GuardMiddleware(broken, max_body_bytes=100, max_json_depth=4, max_in_flight=2, timeout_s=5,
                          retry_after_s=1, api_token="")
    [response] = run(app, post("/v1/x", json_body={}))
    assert_shape(response, 500, "internal_error")
    assert "secret" not in response.text


def test_openapi30_turns_pydantic_schema_into_the_3_0_dialect():
    from services.errors import openapi30

    schema = {"properties": {
        "p": {"anyOf": [{"type": "number", "maximum": 1}, {"type": "null"}], "default": None},
        "ref": {"anyOf": [{"$ref": "#/components/schemas/Bar"}, {"type": "null"}]},
        "price": {"type": "number", "exclusiveMinimum": 0},
        "kind": {"const": "done"},
        "items": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
    }}
    out = openapi30(schema)["properties"]
    assert out["p"] == {"type": "number", "maximum": 1, "default": None, "nullable": True}
    assert out["ref"] == {"allOf": [{"$ref": "#/components/schemas/Bar"}], "nullable": True}
    assert out["price"] == {"type": "number", "minimum": 0, "exclusiveMinimum": True}
    assert out["kind"] == {"enum": ["done"]}
    assert out["items"]["items"] == {"anyOf": [{"type": "string"}, {"type": "integer"}]}


def test_deferred_sigterm_runs_the_previous_handler_once_no_entry_is_left():
    import signal
    import threading

    from services.errors import defer_sigterm, entry_alive

    assert not entry_alive("no-such-entry-service")
    called = threading.Event()
    original = signal.signal(signal.SIGTERM, lambda signum, frame: called.set())
    try:
        assert defer_sigterm("no-such-entry-service", wait_s=30)
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)  # what the arbiter's SIGTERM would do
        assert called.wait(timeout=30)
    finally:
        signal.signal(signal.SIGTERM, original)


def test_guard_dependencies_turns_dependency_failures_into_503_for_calls_and_streams():
    import types

    import aiohttp

    from services.errors import guard_dependencies

    async def call(self):
        raise aiohttp.ServerDisconnectedError()

    async def stream_fails_first(self):
        raise aiohttp.ClientConnectionError("refused")
        yield "never"

    async def stream_fails_later(self):
        yield "first"
        raise aiohttp.ClientConnectionError("reset")

    async def bug(self):
        raise KeyError("a bug stays a bug")

    methods = {name: types.SimpleNamespace(func=func) for name, func in
               [("call", call), ("first", stream_fails_first), ("later", stream_fails_later), ("bug", bug)]}
    guard_dependencies(types.SimpleNamespace(apis=methods))

    async def drain(gen):
        return [item async for item in gen]

    with pytest.raises(ServiceUnavailable):
        asyncio.run(methods["call"].func(None))
    with pytest.raises(ServiceUnavailable):
        asyncio.run(drain(methods["first"].func(None)))
    with pytest.raises(aiohttp.ClientConnectionError):
        asyncio.run(drain(methods["later"].func(None)))
    with pytest.raises(KeyError):
        asyncio.run(methods["bug"].func(None))


def test_a_multipart_body_that_does_not_parse_is_a_400():
    boundary = "d0f43986ca88cfb36206be76e7390e50"
    bad = f"--{boundary}\r\n370--{boundary}--\r\n".encode()
    good = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n"
            f"--{boundary}--\r\n").encode()
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    refused, accepted, no_boundary = run(
        guard(), {"method": "POST", "url": "/v1/upload", "content": bad, "headers": headers},
        {"method": "POST", "url": "/v1/upload", "content": good, "headers": headers},
        {"method": "POST", "url": "/v1/upload", "content": good,
         "headers": {"content-type": "multipart/form-data"}})
    assert_shape(refused, 400, "invalid_multipart")
    assert accepted.status_code == 200
    assert_shape(no_boundary, 400, "invalid_multipart")


def test_the_fast_json_walk_agrees_with_the_one_that_names_the_field():
    """check_value's fast walk (depth only) must accept exactly what the path-building walk accepts."""
    import random

    from services.errors import _acceptable, _locate_problem

    rng = random.Random(0)
    scalars = [1, 2.5, float("inf"), float("nan"), "x", "\ud800", None, True, 10**400, -1e308, [], {}]

    def value(depth: int):
        roll = rng.random()
        if depth > 6 or roll < 0.3:
            return rng.choice(scalars)
        if roll < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {str(i): value(depth + 1) for i in range(rng.randint(0, 3))}

    verdicts = set()
    for _ in range(5000):
        candidate, max_depth = value(0), rng.randint(1, 5)
        fast = _acceptable(candidate, max_depth)
        assert fast == (_locate_problem(candidate, max_depth) is None), (candidate, max_depth)
        verdicts.add(fast)
    assert verdicts == {True, False}  # both outcomes were exercised


def multipart(*parts: tuple[str, str | None, bytes], extra: str = "") -> tuple[bytes, dict[str, str]]:
    """A multipart body of (name, filename or None, value) parts; ``extra`` goes into each header."""
    boundary = "b0undary5ee"
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "") + extra
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}



def test_an_upload_form_must_match_the_fields_the_endpoint_declares():
    from services.errors import FormSpec

    spec = FormSpec(frozenset({"image", "beam_size", "max_length"}), frozenset({"image"}), 8)
    app = guard(max_body_bytes=100_000)
    app.forms = {"/v1/upload": spec}
    cases = {
        "url as text": ([("image", None, b"http://127.0.0.1:9/x.png")], 400, "invalid_multipart", "image"),
        "unknown": ([("image", "a.png", b"PNG"), ("beam_sise", None, b"3")], 400, "unknown_field",
                    "beam_sise"),
        "binary option": ([("image", "a.png", b"PNG"), ("beam_size", "b.bin", b"\xff\xfe")], 400,
                          "invalid_multipart", "beam_size"),
        "long option": ([("image", "a.png", b"PNG"), ("max_length", None, b"9" * 5000)], 400,
                        "invalid_multipart", "max_length"),
        "at the limit": ([("image", "a.png", b"PNG"), ("max_length", None, b"9" * 8)], 200, None, None),
        "twice": ([("image", "a.png", b"PNG"), ("image", "b.png", b"PNG")], 400, "invalid_multipart",
                  "image"),
        "valid": ([("image", "a.png", b"PNG"), ("beam_size", None, b"2")], 200, None, None),
    }
    requests = []
    for parts, *_ in cases.values():
        body, headers = multipart(*parts)
        requests.append({"method": "POST", "url": "/v1/upload", "content": body, "headers": headers})
    for (name, (_, status, code, field)), response in zip(cases.items(), run(app, *requests), strict=True):
        if code is None:
            assert response.status_code == status, (name, response.text)
            continue
        body = assert_shape(response, status, code)
        assert body["error"]["field"] == field, (name, body)


def test_a_file_part_named_only_by_filename_star_is_not_a_file():
    """RFC 7578 forbids ``filename*``; Starlette reads such a part as text, so it is refused as one."""
    from services.errors import FormSpec

    app = guard()
    app.forms = {"/v1/upload": FormSpec(frozenset({"image"}), frozenset({"image"}))}
    body, headers = multipart(("image", None, b"\x89PNG"), extra="; filename*=UTF-8''a.png")
    [response] = run(app, {"method": "POST", "url": "/v1/upload", "content": body, "headers": headers})
    assert assert_shape(response, 400, "invalid_multipart")["error"]["field"] == "image"
