"""The entry's admission middlewares (services/admission.py) on a fake ASGI app: no server, no model."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from services.admission import Body, Deadline, InFlight, Routes, Token, token_ok
from services.body_checks import FormSpec, check_json

API_ROUTES = ["/v1/echo", "/v1/slow", "/v1/slow-stream", "/v1/crash", "/v1/caption", "/v1/upload",
              "/v1/forecast/sessions", "/v1/forecast/sessions/delete"]


async def fake_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers like an endpoint would: by path, after reading the whole body."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/v1/crash":
        raise RuntimeError("/secret/path exploded")
    if path == "/v1/slow":
        await asyncio.sleep(30)
    if path == "/v1/slow-stream":  # answers at once, then takes longer than the deadline to finish
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first ", "more_body": True})
        await asyncio.sleep(1.0)
        await send({"type": "http.response.body", "body": b"last"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body or b"{}"})


class Chain:
    """The middlewares in services/api.py's order around ``fake_app``."""

    def __init__(self, *, max_body_bytes: int = 1000, body_limits=None, max_in_flight: int = 4,
                 timeout_s: float = 5.0, token: str = "", forms=None) -> None:
        app = Deadline(fake_app, timeout_s=timeout_s)
        app = Body(app, max_body_bytes=max_body_bytes, body_limits=body_limits,
                   media_types={"/v1/upload": "multipart/form-data"}, forms=forms, max_json_depth=8)
        self.in_flight = InFlight(app, limit=max_in_flight)
        app = Token(self.in_flight, token=token, paths=["/v1/forecast/sessions"])
        self.app = Routes(app, api_routes=API_ROUTES)

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def run(app, *requests: dict) -> list[httpx.Response]:
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
    [response] = run(Chain(), post("/v1/echo", json_body={"text": "fine", "n": [1, 2.5]}))
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
    [response] = run(Chain(max_body_bytes=1 << 20), post("/v1/echo", body))
    result = assert_shape(response, 400, code)
    assert result["error"]["field"] == field
    assert "Invalid JSON" in result["error"]["message"] or code != "invalid_json"


def test_huge_integer_literal_is_refused_not_crashed():
    assert check_json(b'{"x": ' + b"9" * 5000 + b"}", 8).code == "number_out_of_range"


def test_body_over_the_limit_is_413_from_content_length_and_from_the_stream():
    app = Chain()
    [declared] = run(app, post("/v1/echo", b"{" + b" " * 2000 + b"}"))
    body = assert_shape(declared, 413, "body_too_large")
    assert "1,000 bytes" in body["error"]["message"]

    async def chunks():
        for _ in range(20):
            yield b" " * 100

    [streamed] = run(app, {"method": "POST", "url": "/v1/echo", "content": chunks(),
                           "headers": {"content-type": "application/json"}})
    assert_shape(streamed, 413, "body_too_large")
    assert app.in_flight.count == 0


def test_body_limit_follows_the_longest_matching_prefix():
    app = Chain(body_limits={"/v1/caption": 5000})
    ok, refused = run(app, post("/v1/caption", json_body={"image": "a" * 3000}),
                      post("/v1/echo", json_body={"image": "a" * 3000}))
    assert ok.status_code == 200
    assert_shape(refused, 413, "body_too_large")


def test_unknown_path_and_wrong_method_are_shaped_before_anything_runs():
    unknown, wrong, trace, metrics_post, nested_readyz = run(
        Chain(), post("/v1/nope", json_body={}), {"method": "GET", "url": "/v1/echo"},
        {"method": "TRACE", "url": "/readyz"}, post("/metrics", json_body={}),
        {"method": "GET", "url": "/v1/sentiment/readyz"})
    assert_shape(unknown, 404, "not_found")
    assert_shape(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"
    assert_shape(trace, 405, "method_not_allowed")
    assert assert_shape(metrics_post, 405, "method_not_allowed")["error"]["message"].startswith("This path")
    assert_shape(nested_readyz, 404, "not_found")


def test_content_type_must_be_the_one_the_endpoint_takes_and_only_once():
    plain, twice, upload_as_json = run(
        Chain(), post("/v1/echo", b"{}", headers={"content-type": "text/plain"}),
        {"method": "POST", "url": "/v1/echo", "content": b"{}",
         "headers": [("content-type", "application/json"), ("content-type", "text/plain")]},
        post("/v1/upload", json_body={}))
    assert assert_shape(plain, 415, "unsupported_media_type")["error"]["field"] == "Content-Type"
    assert "several" in assert_shape(twice, 415, "unsupported_media_type")["error"]["message"]
    assert "multipart/form-data" in assert_shape(upload_as_json, 415, "unsupported_media_type")["error"][
        "message"]


def test_an_exception_escaping_the_app_is_a_shaped_500_without_its_text():
    [response] = run(Chain(), post("/v1/crash", json_body={}))
    body = assert_shape(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text
    assert body["detail"] == []


def test_requests_past_max_in_flight_get_503_with_retry_after():
    app = Chain(max_in_flight=2, timeout_s=0.5)
    responses = run(app, *(post("/v1/slow", json_body={}) for _ in range(5)))
    assert sorted(r.status_code for r in responses) == [503] * 5
    codes = sorted(r.json()["error"]["code"] for r in responses)
    assert codes == ["overloaded"] * 3 + ["timeout"] * 2
    assert all(r.headers["retry-after"] == "1" for r in responses)
    assert app.in_flight.count == 0


def test_the_deadline_is_lifted_once_the_answer_has_started():
    [response] = run(Chain(timeout_s=0.3), post("/v1/slow-stream", json_body={}))
    assert response.status_code == 200
    assert response.content == b"first last"


def test_token_protects_only_the_configured_paths():
    missing, wrong, bearer, header, other = run(
        Chain(token="s3cret"),
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


def multipart(*parts: tuple[str, str | None, bytes], extra: str = "") -> tuple[bytes, dict[str, str]]:
    """A multipart body of (name, filename or None, value) parts; ``extra`` goes into each header."""
    boundary = "b0undary5ee"
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "") + extra
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_a_multipart_body_that_does_not_parse_is_a_400():
    boundary = "d0f43986ca88cfb36206be76e7390e50"
    bad = f"--{boundary}\r\n370--{boundary}--\r\n".encode()
    good = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n"
            f"--{boundary}--\r\n").encode()
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    refused, accepted, no_boundary = run(
        Chain(), {"method": "POST", "url": "/v1/upload", "content": bad, "headers": headers},
        {"method": "POST", "url": "/v1/upload", "content": good, "headers": headers},
        {"method": "POST", "url": "/v1/upload", "content": good,
         "headers": {"content-type": "multipart/form-data"}})
    assert_shape(refused, 400, "invalid_multipart")
    assert accepted.status_code == 200
    assert_shape(no_boundary, 400, "invalid_multipart")


def test_an_upload_form_must_match_the_fields_the_endpoint_declares():
    spec = FormSpec(frozenset({"image", "beam_size", "max_length"}), frozenset({"image"}), 8)
    app = Chain(max_body_bytes=100_000, forms={"/v1/upload": spec})
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
    app = Chain(forms={"/v1/upload": FormSpec(frozenset({"image"}), frozenset({"image"}))})
    body, headers = multipart(("image", None, b"\x89PNG"), extra="; filename*=UTF-8''a.png")
    [response] = run(app, {"method": "POST", "url": "/v1/upload", "content": body, "headers": headers})
    assert assert_shape(response, 400, "invalid_multipart")["error"]["field"] == "image"


def test_the_fast_json_walk_agrees_with_the_one_that_names_the_field():
    """check_value's fast walk (depth only) must accept exactly what the path-building walk accepts."""
    import random

    from services.body_checks import _acceptable, _locate_problem

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


def test_a_route_that_takes_no_fields_refuses_one():
    app = Body(fake_app, max_body_bytes=1000, max_json_depth=8, no_fields=frozenset({"/v1/models"}))
    empty, none, typo = run(app, post("/v1/models", json_body={}), post("/v1/models", b""),
                            post("/v1/models", json_body={"verbose": True}))
    assert empty.status_code == none.status_code == 200
    assert_shape(typo, 400, "unknown_field")


def test_fast_routes_answer_registered_routes_and_pass_the_rest_on():
    from pydantic import BaseModel, ConfigDict

    from services import fast_routes

    class Square(BaseModel):
        model_config = ConfigDict(extra="forbid")
        x: int

    class Squared(BaseModel):
        y: int

    async def endpoint(request: Square) -> Squared:
        return Squared(y=request.x * request.x)

    fast_routes.register("/v1/square", Square, endpoint)
    try:
        app = Body(fast_routes.FastRoutes(fake_app), max_body_bytes=1000, max_json_depth=8)
        answered, invalid, other = run(app, post("/v1/square", json_body={"x": 7}),
                                       post("/v1/square", json_body={"x": "seven", "z": 1}),
                                       post("/v1/echo", json_body={"x": 7}))
    finally:
        del fast_routes.HANDLERS["/v1/square"]
    assert answered.status_code == 200 and answered.json() == {"y": 49}
    body = assert_shape(invalid, 400, "validation_error")
    assert {tuple(d["loc"]) for d in body["detail"]} == {("x",), ("z",)}
    assert other.json() == {"x": 7}  # not registered: the app itself answered (fake_app echoes)


def test_a_fast_route_error_is_counted_as_the_endpoint_path_counts_it_once():
    from pydantic import BaseModel

    from services import fast_routes
    from services.errors import ServiceError
    from services.metrics import REJECTED_REQUESTS_TOTAL

    class Anything(BaseModel):
        fail: str

    async def endpoint(request: Anything) -> Anything:
        raise ServiceError.unavailable("down") if request.fail == "503" else ServiceError(
            400, "invalid_request", "no", "fail")

    def count(code: str) -> float:
        return REJECTED_REQUESTS_TOTAL.labels(code)._value.get()

    fast_routes.register("/v1/failing", Anything, endpoint)
    try:
        before = count("model_unavailable"), count("invalid_request")
        app = Body(fast_routes.FastRoutes(fake_app), max_body_bytes=1000, max_json_depth=8)
        down, bad = run(app, post("/v1/failing", json_body={"fail": "503"}),
                        post("/v1/failing", json_body={"fail": "400"}))
    finally:
        del fast_routes.HANDLERS["/v1/failing"]
    assert_shape(down, 503, "model_unavailable")
    assert_shape(bad, 400, "invalid_request")
    assert count("model_unavailable") - before[0] == 1  # a 5xx: once, not twice
    assert count("invalid_request") - before[1] == 0  # an endpoint's 4xx is not a refusal
