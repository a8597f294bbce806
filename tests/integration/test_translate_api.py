"""Translation through real HTTP on a real ``bentoml serve`` with the committed artifact."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.local_server import parse_metrics
from services.schemas.translate import (
    MAX_BEAM_SIZE,
    MAX_ITEMS,
    MAX_LENGTH,
    MAX_TEXT_CHARS,
    TRANSLATE_EXAMPLE,
    TRANSLATE_SINGLE_EXAMPLE,
    TRANSLATE_STREAM_EXAMPLE,
)

TEXTS = [
    "I love dogs.",
    "Where is the train station?",
    "Tom didn't want to tell Mary what had happened to her car.",
    "Go.",
    "She has been learning Spanish for three years, but she still can't order a coffee.",
]


def decoder_metric(client, name: str, **labels: str) -> float:
    """A translate decode-loop sample from /metrics, summed over workers."""
    wanted = {"model": "translate", **labels}
    return sum(value for (sample, found), value in parse_metrics(client.get("/metrics").text).items()
               if sample == name and wanted.items() <= dict(found).items())


def post(client, body: dict) -> dict:
    response = client.post("/v1/translate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(client, body: dict) -> tuple[list[dict], dict]:
    response = client.post("/v1/translate/stream", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in response.text.split("\n\n") if f.strip()]
    assert all(f.startswith("data: ") for f in frames), frames
    *deltas, done = [json.loads(f[len("data: "):]) for f in frames]
    assert done["done"] is True and all("delta" in d for d in deltas)
    return deltas, done


def test_i_love_dogs_is_translated_with_case_punctuation_and_model_info(client):
    body = post(client, TRANSLATE_SINGLE_EXAMPLE)
    assert body["model"]["name"] == "translate" and body["model"]["task"] == "translate"
    (result,) = body["results"]
    assert "perro" in result["translation"].lower(), result
    assert result["translation"][0].isupper() and result["translation"].endswith(".")
    assert result["beam_size"] == 4 and result["input_tokens"] >= 3 and not result["truncated"]
    assert result["attention"] is None


def test_list_keeps_order_and_matches_single_calls(client):
    batched = post(client, {"texts": TEXTS, "beam_size": 2})["results"]
    assert len(batched) == len(TEXTS)
    for text, result in zip(TEXTS, batched, strict=True):
        (single,) = post(client, {"text": text, "beam_size": 2})["results"]
        assert single["translation"] == result["translation"]
        assert single["score"] == pytest.approx(result["score"], abs=1e-3)


OPTION_MIX = ((1, MAX_LENGTH, False), (4, 5, True), (8, MAX_LENGTH, False))


def test_concurrent_requests_with_mixed_options_each_get_their_own_answer(client):
    cases = [{"text": text, "beam_size": beam, "max_length": max_length, "return_attention": attention}
             for text in TEXTS[:4]
             for beam, max_length, attention in OPTION_MIX]
    expected = [post(client, case)["results"][0] for case in cases]
    rows_before = decoder_metric(client, "rnnserve_decoder_tokens_per_step_sum")
    steps_before = decoder_metric(client, "rnnserve_decoder_tokens_per_step_count")
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:  # arrive together: share decoder steps
        concurrent = list(pool.map(lambda case: post(client, case)["results"][0], cases))
    rows = decoder_metric(client, "rnnserve_decoder_tokens_per_step_sum") - rows_before
    steps = decoder_metric(client, "rnnserve_decoder_tokens_per_step_count") - steps_before
    # Fewer steps than rows stepped: steps carried rows of several requests, with mixed options.
    assert steps < rows, f"{steps} decoder steps for {rows} rows: no request shared a step"
    for case, want, got in zip(cases, expected, concurrent, strict=True):
        assert got["translation"] == want["translation"], case
        assert got["score"] == pytest.approx(want["score"], abs=1e-3)
        assert got["beam_size"] == case["beam_size"] and got["output_tokens"] <= case["max_length"]
        assert (got["attention"] is not None) == case["return_attention"]


def test_attention_has_one_row_per_output_token_over_the_source_pieces(client):
    (result,) = post(client, {"text": TEXTS[1], "beam_size": 4, "return_attention": True})["results"]
    assert len(result["attention"]) == result["output_tokens"] == len(result["output_pieces"])
    assert "".join(result["output_pieces"]) == result["translation"]
    assert "".join(result["source_pieces"]) == TEXTS[1]
    for row in result["attention"]:
        assert len(row) == result["input_tokens"]
        assert sum(row) == pytest.approx(1.0, abs=1e-4)


def test_max_length_cuts_and_flags_truncation(client):
    (result,) = post(client, {"text": TEXTS[4], "beam_size": 1, "max_length": 3})["results"]
    assert result["output_tokens"] == 3 and result["truncated"] is True


@pytest.mark.parametrize("text", [*TEXTS, TRANSLATE_STREAM_EXAMPLE["text"]])
def test_stream_assembles_the_same_text_as_the_greedy_call(client, text):
    deltas, done = stream(client, {"text": text})
    assert "".join(d["delta"] for d in deltas) == done["translation"]
    (greedy,) = post(client, {"text": text, "beam_size": 1})["results"]
    assert done["translation"] == greedy["translation"]
    assert done["output_tokens"] == greedy["output_tokens"]
    if greedy["output_tokens"] > 2:
        assert len(deltas) > 1  # sent piece by piece, not as one block


def test_unknown_words_and_characters_are_not_errors(client):
    (result,) = post(client, {"text": "Zorblax 😀 visited 東京 with a naïve ñandú."})["results"]
    assert result["translation"].strip()
    _, done = stream(client, {"text": "Qwxyz ☃ 🐕!"})
    assert isinstance(done["translation"], str)


def test_example_payloads_are_accepted(client):
    assert len(post(client, TRANSLATE_EXAMPLE)["results"]) == len(TRANSLATE_EXAMPLE["texts"])


def test_models_lists_translate_with_test_bleu(client):
    models = {m["name"]: m for m in client.post("/v1/models", json={}).json()}
    metrics = models["translate"]["metrics"]
    assert models["translate"]["cell"] in {"rnn_tanh", "gru", "lstm"}
    assert {"test_bleu_greedy", "test_chrf_greedy", "test_bleu_beam4", "test_chrf_beam4"} <= set(metrics)


BAD_INPUTS = [
    ("empty text", {"text": ""}, "empty or only whitespace"),
    ("whitespace only", {"text": " \n\t "}, "empty or only whitespace"),
    ("text too long", {"text": "a" * (MAX_TEXT_CHARS + 1)}, f"at most {MAX_TEXT_CHARS} characters"),
    ("empty item in list", {"texts": ["ok", ""]}, "empty or only whitespace"),
    ("too many items", {"texts": ["a"] * (MAX_ITEMS + 1)}, f"at most {MAX_ITEMS} items"),
    ("empty list", {"texts": []}, "at least 1 item"),
    ("beam size 0", {"text": "hi", "beam_size": 0}, "greater than or equal to 1"),
    ("beam size too big", {"text": "hi", "beam_size": MAX_BEAM_SIZE + 1},
     f"less than or equal to {MAX_BEAM_SIZE}"),
    ("max_length 0", {"text": "hi", "max_length": 0}, "greater than or equal to 1"),
    ("max_length too big", {"text": "hi", "max_length": MAX_LENGTH + 1},
     f"less than or equal to {MAX_LENGTH}"),
    ("length penalty too big", {"text": "hi", "length_penalty": 5}, "less than or equal to 2"),
    ("beam size as string", {"text": "hi", "beam_size": "4"}, "valid integer"),
    ("beam size as float", {"text": "hi", "beam_size": 2.5}, "valid integer"),
    ("attention flag as string", {"text": "hi", "return_attention": "yes"}, "valid boolean"),
    ("text as number", {"text": 42}, "valid string"),
    ("texts as string", {"texts": "hello"}, "valid array"),
    ("both fields", {"text": "a", "texts": ["b"]}, "exactly one of"),
    ("neither field", {}, "exactly one of"),
    ("unknown field", {"text": "hi", "target_language": "fr"}, "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_400_that_names_the_problem(client, case, body, message):
    response = client.post("/v1/translate", json=body)
    assert response.status_code == 400, response.text
    assert message in response.text


BAD_STREAMS = [
    ("empty text", {"text": ""}, "empty or only whitespace"),
    ("text too long", {"text": "a" * (MAX_TEXT_CHARS + 1)}, f"at most {MAX_TEXT_CHARS} characters"),
    ("max_length too big", {"text": "hi", "max_length": MAX_LENGTH + 1},
     f"less than or equal to {MAX_LENGTH}"),
    ("beam size (stream is greedy)", {"text": "hi", "beam_size": 4}, "Extra inputs are not permitted"),
    ("list of texts", {"texts": ["hi"]}, "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_STREAMS, ids=[c[0] for c in BAD_STREAMS])
def test_bad_stream_input_gets_a_400_that_names_the_problem(client, case, body, message):
    response = client.post("/v1/translate/stream", json=body)
    assert response.status_code == 400, response.text
    assert message in response.text


def test_wrong_content_type_is_a_415(client):
    response = client.post("/v1/translate", content=b"I love dogs.", headers={"content-type": "text/plain"})
    assert response.status_code == 415


def test_metrics_count_generated_tokens_and_beam_sizes(client):
    post(client, {"text": TEXTS[0], "beam_size": 3})
    stream(client, {"text": TEXTS[0]})
    text = client.get("/metrics").text
    for name in ("rnnserve_translate_generated_tokens_total", "rnnserve_translate_beam_size_bucket",
                 "rnnserve_translate_decode_steps_bucket", "rnnserve_translate_output_length_tokens_bucket",
                 "rnnserve_translate_generated_tokens_per_second_bucket"):
        assert name in text, name
    assert 'decoder="stream"' in text and 'model="translate"' in text


LONG = "no " * 21 + "no"  # 22 source tokens; the model repeats itself up to its 80-token cap


def test_streams_closed_after_the_first_event_free_their_rows(server, client):
    # Issue 13, finding 3: a client that hangs up stops its decoding at the next steps.
    import httpx

    cancelled_before = decoder_metric(client, "rnnserve_decoder_retired_rows_total", reason="cancelled")
    streams = 16

    def first_event_then_hang_up(_: int) -> str:
        with httpx.Client(base_url=server.url, timeout=60) as http, \
                http.stream("POST", "/v1/translate/stream", json={"text": LONG}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    return line  # leaving the block closes the connection mid-stream
        return ""

    def heavy() -> None:  # 128 beam rows share every step, so a stream takes seconds, not a blink
        post(client, {"texts": [LONG] * 16, "beam_size": 8})

    with ThreadPoolExecutor(max_workers=streams + 1) as pool:
        background = pool.submit(heavy)
        for _ in range(200):
            if decoder_metric(client, "rnnserve_decoder_active_rows") >= 128:
                break
            time.sleep(0.02)
        firsts = list(pool.map(first_event_then_hang_up, range(streams)))
        background.result()
    assert all('"delta"' in first for first in firsts)
    cancelled = 0.0
    for _ in range(100):  # the entry notices at its next write, then the model service at its own
        cancelled = decoder_metric(client, "rnnserve_decoder_retired_rows_total",
                                   reason="cancelled") - cancelled_before
        if cancelled >= streams and decoder_metric(client, "rnnserve_decoder_active_rows") == 0:
            break
        time.sleep(0.1)
    assert decoder_metric(client, "rnnserve_decoder_active_rows") == 0
    # Each of them would have run 80 steps; a stream finished on its own is retired as max_length.
    assert cancelled >= streams // 2, f"only {cancelled} of {streams} hung-up streams were cancelled"


EMOJI = "😀" * 30  # 30 characters, 120 byte-level source tokens


def test_source_tokens_decoder_work_and_attention_are_bounded_naming_the_field(client):
    # Issue 13, findings 4 and 6: within the character limit, still refused before any decoding.
    response = client.post("/v1/translate", json={"texts": ["Go.", EMOJI]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == "texts[1]" and "subword tokens; the limit is" in error["message"]
    stream_response = client.post("/v1/translate/stream", json={"text": EMOJI})
    assert stream_response.status_code == 400 and stream_response.json()["error"]["field"] == "text"
    heavy = {"texts": ["Tom " * 80] * MAX_ITEMS, "beam_size": MAX_BEAM_SIZE}  # ~81 tokens each
    response = client.post("/v1/translate", json=heavy)
    assert response.status_code == 400 and "units of decoder work" in response.text, response.text
    response = client.post("/v1/translate", json={"texts": ["Tom " * 80] * 16, "beam_size": 1,
                                                  "return_attention": True})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "return_attention" and "attention cells" in response.text
    assert post(client, {"text": "Go.", "return_attention": True})["results"][0]["attention"]


def test_decoder_metrics_are_exported(client):
    post(client, {"text": TEXTS[0], "beam_size": 2})
    text = client.get("/metrics").text
    for name in ("active_rows", "queue_length", "step_seconds_bucket", "tokens_per_step_bucket",
                 "time_to_first_token_seconds_bucket", "retired_rows_total"):
        assert f"rnnserve_decoder_{name}{{" in text, name
    assert 'reason="eos"' in text and 'model="translate"' in text
