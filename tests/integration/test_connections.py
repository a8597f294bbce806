"""Connection bounds on a real server (services/bentoml_compat.py BoundedHttpToolsProtocol, admission.Body).

An outside probe kept idle and trickling connections open past 300 s, exhausted a worker's file
descriptors with idle connections, held every in-flight slot with unfinished bodies, and had a 100 MB
header answered 200. Each bound here is a setting, set small for the test; every refusal has the error
shape. The waits below only bound how long a test may hang: nothing asserts a duration.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Server

LIMITS = {"RNNSERVE_API_WORKERS": "1", "RNNSERVE_HEADER_TIMEOUT_S": "1", "RNNSERVE_BODY_TIMEOUT_S": "1",
          "RNNSERVE_KEEP_ALIVE_S": "1", "RNNSERVE_MAX_CONNECTIONS": "8", "RNNSERVE_MAX_HEADER_BYTES": "4096"}


@pytest.fixture(scope="module")
def bounded(bentoml_home) -> Iterator[Server]:
    server = Server(bentoml_home, env=LIMITS).start()
    try:
        yield server
    finally:
        server.stop()


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.settimeout(30)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One response: its head, then as many body bytes as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b""
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def answer(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def test_a_connection_that_sends_nothing_is_closed_with_408(bounded):
    with connect(bounded) as sock:
        status, _, body = answer(read_until_closed(sock))
    assert (status, body["error"]["code"]) == (408, "header_timeout")


def test_headers_that_trickle_are_cut_off_with_408(bounded):
    with connect(bounded) as sock:
        sock.sendall(b"POST /v1/sentiment HTTP/1.1\r\nHost: x\r\n")
        for _ in range(20):  # one header byte every 0.2 s: 4 s in all, past the 1 s bound
            try:
                sock.sendall(b"X")
            except OSError:
                break  # the server closed it
            time.sleep(0.2)
        status, _, body = answer(read_until_closed(sock))
    assert (status, body["error"]["code"]) == (408, "header_timeout")


def test_headers_over_the_limit_get_431_and_the_header_limit_passes_at_its_edge(bounded):
    with connect(bounded) as sock:
        sock.sendall(b"POST /v1/sentiment HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
        status, _, body = answer(read_until_closed(sock))
    assert (status, body["error"]["code"]) == (431, "headers_too_large")
    payload = json.dumps({"text": "fine"}).encode()
    request = (b"POST /v1/sentiment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n")
    filler = 4096 - len(request) - len(b"X-Pad: \r\n\r\n") - 1  # the whole head one byte under the limit
    with connect(bounded) as sock:
        sock.sendall(request + b"X-Pad: " + b"p" * filler + b"\r\n\r\n" + payload)
        status, _, body = answer(read_until_closed(sock))
    assert status == 200, body


def test_a_body_that_never_finishes_gets_408_with_the_error_shape(bounded):
    with connect(bounded) as sock:
        sock.sendall(b"POST /v1/sentiment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"text\": ")
        status, headers, body = answer(read_response(sock))
    assert (status, body["error"]["code"]) == (408, "body_timeout")
    assert headers["content-type"] == "application/json"


def test_malformed_http_gets_a_shaped_400(bounded):
    with connect(bounded) as sock:
        sock.sendall(b"GARBAGE\x00 / HTTP/9\r\n\r\n")
        status, _, body = answer(read_until_closed(sock))
    assert (status, body["error"]["code"]) == (400, "invalid_http")


def test_an_idle_keep_alive_connection_is_closed(bounded):
    with connect(bounded) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = read_until_closed(sock)  # the answer, then the close after keep_alive_s idle
    assert raw.startswith(b"HTTP/1.1 200")


def test_connections_past_the_limit_are_refused_with_503_and_retry_after(bounded):
    sockets = [connect(bounded) for _ in range(12)]
    try:
        answers = [answer(read_until_closed(sock)) for sock in sockets]  # 503 at once, or 408 after 1 s
        refused = [(status, headers) for status, headers, body in answers
                   if body["error"]["code"] == "too_many_connections"]
        assert len(refused) >= 12 - 8, answers
        assert all(status == 503 and headers["retry-after"] == "1" for status, headers in refused)
        assert {body["error"]["code"] for _, _, body in answers} <= {"too_many_connections", "header_timeout"}
    finally:
        for sock in sockets:
            sock.close()
    with connect(bounded) as sock:  # once they are gone, a new connection is served
        sock.settimeout(30)
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200")
