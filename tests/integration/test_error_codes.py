"""Every error code in SECURITY.md's table reaches a client unchanged, over real HTTP.

The table is read from SECURITY.md, so a code added there without a way to produce it fails here. Each
code is produced on the shared server where a plain request can; the few that need a server in a
special state (a worker killed, a limit set tiny) are produced by the named test, whose existence is
checked here.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from services.schemas.caption import CAPTION_EXAMPLE
from services.schemas.forecast import EXAMPLE_BARS
from tests.conftest import ROOT


def table_codes() -> set[str]:
    section = (ROOT / "SECURITY.md").read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
    codes = set()
    for line in section.splitlines():
        if re.match(r"\|\s*\d{3}", line):
            codes.update(re.findall(r"`([a-z0-9_]+)`", line.split("|")[2]))
    return codes


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (RGB) with a tiny compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + \
        chunk(b"IEND", b"")


def gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "GIF")
    return buffer.getvalue()


def caption(data: bytes) -> dict:
    return {**CAPTION_EXAMPLE, "image": base64.b64encode(data).decode()}


def raw_http(server, request: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(client: httpx.Client, route: str, **kwargs) -> httpx.Response:
    return client.post(route, **kwargs)


# code -> (expected status, how to produce it on the shared server)
PRODUCE: dict[str, tuple[int, Callable]] = {
    "validation_error": (400, lambda c, s: post(c, "/v1/sentiment", json={"texts": []})),
    "unknown_field": (400, lambda c, s: post(c, "/v1/sentiment", json={"text": "a", "lang": "en"})),
    "invalid_json": (400, lambda c, s: post(c, "/v1/sentiment", content=b'{"text": ',
                                            headers={"content-type": "application/json"})),
    "invalid_utf8": (400, lambda c, s: post(c, "/v1/sentiment", content=b'{"text": "\xff"}',
                                            headers={"content-type": "application/json"})),
    "invalid_unicode": (400, lambda c, s: post(c, "/v1/sentiment", content=b'{"text": "\\ud800"}',
                                               headers={"content-type": "application/json"})),
    "too_deeply_nested": (400, lambda c, s: post(c, "/v1/sentiment", content=b"[" * 100 + b"]" * 100,
                                                 headers={"content-type": "application/json"})),
    "number_out_of_range": (400, lambda c, s: post(c, "/v1/sentiment", content=b'{"text": 1e999}',
                                                   headers={"content-type": "application/json"})),
    "invalid_multipart": (400, lambda c, s: post(c, "/v1/caption/upload",
                                                 files={"image": (None, "http://127.0.0.1:9/x.png")})),
    "invalid_http": (400, lambda c, s: raw_http(s, b"NOT HTTP AT ALL\x00\r\n\r\n")),
    "invalid_request": (400, lambda c, s: post(c, "/v1/forecast", json={"rows": EXAMPLE_BARS[:3]})),
    "invalid_image": (400, lambda c, s: post(c, "/v1/caption", json=caption(b"\x89PNG\r\n\x1a\n broken"))),
    "not_found": (404, lambda c, s: post(c, "/v1/no-such-model", json={})),
    "session_not_found": (404, lambda c, s: post(c, "/v1/forecast/sessions/get",
                                                 json={"session_id": "no-such-session"})),
    "method_not_allowed": (405, lambda c, s: c.get("/v1/sentiment")),
    "body_too_large": (413, lambda c, s: post(c, "/v1/sentiment", json={"text": "a" * (2 << 20)})),
    "image_too_large": (413, lambda c, s: post(c, "/v1/caption", json=caption(png_header(60000, 60000)))),
    "unsupported_media_type": (415, lambda c, s: post(c, "/v1/sentiment", content=b"hello",
                                                      headers={"content-type": "text/plain"})),
    "unsupported_image_format": (415, lambda c, s: post(c, "/v1/caption", json=caption(gif()))),
    "stale_bar": (409, lambda c, s: stale_step(c)),
}


def stale_step(client: httpx.Client) -> httpx.Response:
    created = post(client, "/v1/forecast/sessions", json={"history": EXAMPLE_BARS[:30]}).json()
    return post(client, "/v1/forecast/sessions/step",
                json={"session_id": created["session_id"], "bar": EXAMPLE_BARS[3]})

# Codes that need a server in a special state, and the test that produces each over HTTP.
ELSEWHERE = {
    "unauthorized": "tests/integration/test_faults.py::test_the_api_token_protects_the_session_endpoints",
    "header_timeout": "tests/integration/test_connections.py::"
                      "test_a_connection_that_sends_nothing_is_closed_with_408",
    "body_timeout": "tests/integration/test_connections.py::"
                    "test_a_body_that_never_finishes_gets_408_with_the_error_shape",
    "headers_too_large": "tests/integration/test_connections.py::"
                         "test_headers_over_the_limit_get_431_and_the_header_limit_passes_at_its_edge",
    "too_many_connections": "tests/integration/test_connections.py::"
                            "test_connections_past_the_limit_are_refused_with_503_and_retry_after",
    "too_many_sessions": "tests/integration/test_forecast_api.py::"
                         "test_session_limit_is_a_clear_429_and_idle_sessions_expire",
    "model_unavailable": "tests/integration/test_faults.py::"
                         "test_damaged_model_answers_503_with_retry_after_and_the_others_serve",
    "not_ready": "tests/integration/test_faults.py::test_damaged_model_is_not_loaded_and_readyz_names_it",
    "internal_error": "tests/unit/test_admission.py::"
                      "test_an_exception_escaping_the_app_is_a_shaped_500_without_its_text",
    "overloaded": "tests/unit/test_admission.py::test_requests_past_max_in_flight_get_503_with_retry_after",
    "session_store_unavailable": "tests/integration/test_forecast_redis.py::"
                                 "test_redis_down_is_a_503_on_session_routes_only",
    "session_model_mismatch": "tests/unit/test_session_store.py::"
                              "test_a_state_stored_by_another_model_version_is_refused",
    "session_busy": "tests/unit/test_forecast_service.py::"
                    "test_a_step_that_keeps_losing_the_compare_and_set_is_a_503_session_busy_and_changes_nothing",
    "timeout": "tests/unit/test_admission.py::test_requests_past_max_in_flight_get_503_with_retry_after",
}


def test_every_code_in_the_table_is_produced_somewhere():
    codes = table_codes()
    assert len(codes) > 20, codes
    assert codes == set(PRODUCE) | set(ELSEWHERE), (
        f"in SECURITY.md only: {sorted(codes - set(PRODUCE) - set(ELSEWHERE))}; "
        f"produced but undocumented: {sorted((set(PRODUCE) | set(ELSEWHERE)) - codes)}")
    for code, test in ELSEWHERE.items():
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text() and f'"{code}"' in (ROOT / path).read_text(), (
            code, test)


@pytest.mark.parametrize("code", sorted(PRODUCE))
def test_the_code_reaches_the_client_in_the_error_shape(client, server, code):
    status, produce = PRODUCE[code]
    answer = produce(client, server)
    if isinstance(answer, httpx.Response):
        assert answer.headers["content-type"] == "application/json", answer.text
        answer = (answer.status_code, answer.json())
    got_status, body = answer
    assert set(body) == {"error", "detail"} and set(body["error"]) == {"code", "message", "field"}
    assert (got_status, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"]


def test_the_table_is_the_one_the_docs_point_to():
    assert Path(ROOT / "SECURITY.md").read_text().count("## Errors") == 1
