"""A model service served alone behaves as it does composed under the entry (services/lifecycle.py).

Nothing rewrites a service class from outside any more: ``bentoml serve services.translate:Translate``
loads, verifies and warms up the same way, reports ready the same way, answers the same translations
and writes its errors in the same shape as the service the entry starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from services.schemas.translate import TranslateRequest
from tests.conftest import Server

TEXTS = ["I like dogs.", "Where is the train station?"]


@pytest.fixture(scope="module")
def translate_alone(bentoml_home) -> Iterator[httpx.Client]:
    server = Server(bentoml_home, target="services.translate:Translate").start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            yield http
    finally:
        server.stop()


def test_alone_it_is_ready_and_reports_its_model(translate_alone, client):
    assert translate_alone.get("/readyz").status_code == 200
    alone = translate_alone.post("/info", json={}).json()
    composed = next(m for m in client.post("/v1/models", json={}).json() if m["name"] == "translate")
    assert alone["name"] == "translate" and alone["version"] == composed["version"]


def test_alone_it_answers_what_the_composed_service_answers(translate_alone, client):
    items = [item.model_dump() for item in TranslateRequest(texts=TEXTS, beam_size=1).items()]
    alone = translate_alone.post("/translate", json={"items": items})
    assert alone.status_code == 200, alone.text
    composed = client.post("/v1/translate", json={"texts": TEXTS, "beam_size": 1})
    assert composed.status_code == 200, composed.text
    assert [r["translation"] for r in alone.json()] == [r["translation"] for r in composed.json()["results"]]


def test_alone_its_errors_have_the_one_shape(translate_alone):
    response = translate_alone.post("/translate", json={"items": [{"text": 42}]})
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"]["code"] == "validation_error"
    assert body["error"]["field"].startswith("items[0]")
