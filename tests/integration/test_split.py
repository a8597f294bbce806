"""Each model on its own (slow: two `bentoml serve` processes): the entry reaches translate by URL.

The entry (sentiment and forecast windows in its own workers; caption and forecast sessions embedded)
is started with RNNSERVE_TRANSLATE_URL pointing at a port where nothing listens yet, as a translate
Deployment that is down or not yet started would be. Then translate is served alone on that port, and
stopped again. Throughout, sentiment and forecast answer 200 and the entry stays ready; translate
answers 503 with Retry-After while it is down, and /v1/models says which model is unavailable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.schemas.forecast import FORECAST_EXAMPLE
from services.schemas.sentiment import SENTIMENT_EXAMPLE
from services.schemas.translate import TRANSLATE_EXAMPLE
from tests.conftest import Server, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def translate_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def entry(bentoml_home: Path, translate_port: int) -> Iterator[httpx.Client]:
    server = Server(bentoml_home, env={"RNNSERVE_TRANSLATE_URL": f"http://127.0.0.1:{translate_port}"})
    server.start()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    server.stop()


def translate_alone(bentoml_home: Path, port: int) -> Server:
    server = Server(bentoml_home, target="services.translate:Translate")
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    return server


def states(client: httpx.Client) -> dict[str, str]:
    response = client.post("/v1/models", json={})
    assert response.status_code == 200, response.text
    return {model["name"]: model["state"] for model in response.json()}


def assert_own_models_serve(client: httpx.Client) -> None:
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/sentiment", json=SENTIMENT_EXAMPLE).status_code == 200
    assert client.post("/v1/forecast", json=FORECAST_EXAMPLE).status_code == 200


def assert_translate_down(client: httpx.Client) -> None:
    response = client.post("/v1/translate", json=TRANSLATE_EXAMPLE)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert response.json()["error"]["code"] == "model_unavailable"
    assert states(client) == {"sentiment": "ready", "forecast": "ready", "caption": "ready",
                              "translate": "unavailable"}


def test_translate_down_up_down(entry, bentoml_home, translate_port):
    # 1. Never started: the entry is ready anyway, and only translate answers 503.
    assert_own_models_serve(entry)
    assert_translate_down(entry)
    assert_own_models_serve(entry)

    # 2. Translate comes up on its own: the entry reaches it by URL, nothing restarted.
    translate = translate_alone(bentoml_home, translate_port).start()
    try:
        response = entry.post("/v1/translate", json=TRANSLATE_EXAMPLE)
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["translation"]
        assert states(entry)["translate"] == "ready"
        assert_own_models_serve(entry)
    finally:
        translate.stop()

    # 3. Stopped again: back to 503 on translate only.
    for _ in range(60):  # polls, 0.5 s apart: a bound on the wait, not a speed assertion
        if entry.post("/v1/translate", json=TRANSLATE_EXAMPLE).status_code != 200:
            break
        time.sleep(0.5)
    else:
        pytest.fail("translate still answers after its server stopped")
    assert_translate_down(entry)
    assert_own_models_serve(entry)


def test_request_id_is_echoed_or_generated(entry):
    given = entry.post("/v1/sentiment", json=SENTIMENT_EXAMPLE, headers={"X-Request-ID": "abc-123.x:y"})
    assert given.headers["x-request-id"] == "abc-123.x:y"
    for bad in ("bad id;x", "x" * 129):  # a character outside the set; past RNNSERVE_MAX_REQUEST_ID_CHARS
        generated = entry.post("/v1/sentiment", json=SENTIMENT_EXAMPLE, headers={"X-Request-ID": bad})
        assert generated.status_code == 200
        assert generated.headers["x-request-id"] != bad and len(generated.headers["x-request-id"]) == 32
    assert len(entry.post("/v1/sentiment", json=SENTIMENT_EXAMPLE,
                          headers={"X-Request-ID": "y" * 128}).headers["x-request-id"]) == 128
    # A refusal (404 from the route check) carries one too.
    assert entry.get("/v1/nowhere").headers["x-request-id"]
