"""The entry's request id reaches the model service it calls: the model service's log line for the
same request carries it (services/observability.py RequestIdPropagator and adopt_request_id)."""

from __future__ import annotations

import secrets
import time

import httpx

from tests.conftest import Server


def lines_with(server: Server, needle: str) -> list[str]:
    for _ in range(40):  # polls, 0.25 s apart: a bound on the wait for the log to be written
        lines = [line for line in server.log_path.read_text().splitlines() if needle in line]
        if any("[service:translate" in line for line in lines):
            return lines
        time.sleep(0.25)
    return lines


def test_the_callers_request_id_is_in_the_translate_services_log_line(server: Server, client: httpx.Client):
    request_id = f"trace-{secrets.token_hex(6)}"
    # More source tokens than the artifact's limit: only the translate service, which tokenizes, can
    # tell, so it answers the 400 and logs it.
    response = client.post("/v1/translate", json={"texts": ["a " * 200]},
                           headers={"X-Request-ID": request_id})
    assert response.status_code == 400, response.text
    assert response.headers["x-request-id"] == request_id
    lines = lines_with(server, request_id)
    translate = [line for line in lines if "[service:translate" in line]
    assert translate, f"no translate log line carries {request_id}: {lines}"
    assert all(f"request_id={request_id}" in line for line in translate)


def test_a_generated_id_travels_too_and_a_bad_one_never_reaches_a_log(server: Server, client: httpx.Client):
    bad = "forged\nline"  # refused by the entry, replaced by a generated id
    response = client.post("/v1/translate", json={"texts": ["a " * 200]},
                           headers={"X-Request-ID": bad.replace("\n", "%0A")})
    generated = response.headers["x-request-id"]
    assert response.status_code == 400 and len(generated) == 32
    assert any("[service:translate" in line for line in lines_with(server, generated))
