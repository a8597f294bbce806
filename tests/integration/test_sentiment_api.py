"""Sentiment through real HTTP on a real ``bentoml serve``."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from services.schemas.sentiment import (
    EXAMPLE_TEXTS,
    MAX_ITEMS,
    MAX_TEXT_CHARS,
    SENTIMENT_EXAMPLE,
    SENTIMENT_SINGLE_EXAMPLE,
)
from tests.conftest import ARTIFACTS, batch_histogram

# The token limit is the artifact's own (services/sentiment.py reads it from the model).
MAX_TOKENS = json.loads((ARTIFACTS / "sentiment" / "metadata.json").read_text())["max_tokens"]


def test_single_text_gets_label_score_probabilities_and_model(client):
    response = client.post("/v1/sentiment", json=SENTIMENT_SINGLE_EXAMPLE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == "sentiment"
    assert re.fullmatch(r"[0-9a-f]{16}", body["model"]["version"])
    (result,) = body["results"]
    assert set(result["probabilities"]) == {"negative", "positive"}
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["score"] == max(result["probabilities"].values())
    assert result["label"] == "positive"


def test_list_keeps_request_order_and_matches_single_calls(client):
    texts = [*EXAMPLE_TEXTS, "fine .", "an utterly charmless , joyless and overlong sequel"]
    batched = client.post("/v1/sentiment", json={"texts": texts}).json()["results"]
    assert [r["label"] for r in batched[:2]] == ["positive", "negative"]
    for text, result in zip(texts, batched, strict=True):
        single = client.post("/v1/sentiment", json={"text": text}).json()["results"][0]
        assert single["label"] == result["label"]
        assert single["score"] == pytest.approx(result["score"], abs=1e-5)


def test_model_info_lists_sentiment_with_its_metrics(client):
    models = {m["name"]: m for m in client.post("/v1/models", json={}).json()}
    info = models["sentiment"]
    assert info["cell"] in {"rnn_tanh", "gru", "lstm"}
    assert 0.5 < info["metrics"]["dev_accuracy"] <= 1.0


BAD_INPUTS = [
    ("empty text", {"text": ""}, 400, "empty or only whitespace"),
    ("whitespace only", {"text": " \t\n "}, 400, "empty or only whitespace"),
    ("non-string item", {"texts": ["good", 42]}, 400, "valid string"),
    ("null item", {"texts": [None]}, 400, "valid string"),
    ("too many items", {"texts": ["a"] * (MAX_ITEMS + 1)}, 400, f"at most {MAX_ITEMS} items"),
    ("too many characters", {"text": "a" * (MAX_TEXT_CHARS + 1)}, 400, str(MAX_TEXT_CHARS)),
    ("too many tokens", {"text": "ok " * (MAX_TOKENS + 1)}, 400, f"the limit is {MAX_TOKENS}"),
    ("at the token limit", {"text": "ok " * MAX_TOKENS}, 200, '"tokens"'),
    ("too many tokens in a list", {"texts": ["fine", "ok " * (MAX_TOKENS + 1)]}, 400, "texts[1]"),
    ("neither field", {}, 400, "exactly one of"),
    ("unknown field", {"text": "a", "language": "en"}, 400, "Extra inputs are not permitted"),
    ("list body", ["good"], 400, "Input should be an object"),
]


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_4xx_that_names_the_problem(client, case, body, status, message):
    response = client.post("/v1/sentiment", json=body)
    assert response.status_code == status, response.text
    assert message in response.text


def test_malformed_json_is_a_400(client):
    response = client.post("/v1/sentiment", content=b'{"text": "unterminated',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "Invalid JSON" in response.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_a_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/sentiment", content=b'{"text": "fine"}', headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_concurrent_requests_are_batched_on_the_server(client, server):
    before_sum, before_count = batch_histogram(client, "sentiment", "classify")

    def one(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            text = EXAMPLE_TEXTS[i % 2] + " word" * (i % 7)
            return http.post("/v1/sentiment", json={"text": text}).status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(one, range(128)))
    assert statuses == [200] * 128
    after_sum, after_count = batch_histogram(client, "sentiment", "classify")
    requests, calls = after_sum - before_sum, after_count - before_count
    assert requests == 128, "every request went through the batcher once"
    # Fewer model calls than requests means some calls carried more than one request.
    assert calls < requests, f"{calls} model calls for {requests} requests: no batching happened"


def test_metrics_expose_length_padding_and_inference_time(client):
    client.post("/v1/sentiment", json=SENTIMENT_EXAMPLE)
    text = client.get("/metrics").text
    for name in ("rnnserve_model_input_length_tokens_count", "rnnserve_model_batch_padding_ratio_count",
                 "rnnserve_model_inference_seconds_count"):
        assert re.search(rf'^{name}\{{model="sentiment"\}} [1-9]', text, flags=re.M), name


def test_openapi_documents_the_endpoint_with_its_example(client):
    spec = client.get("/docs.json").json()
    assert "/v1/sentiment" in spec["paths"]
    assert EXAMPLE_TEXTS[0] in client.get("/docs.json").text
