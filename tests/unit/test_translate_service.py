"""Translation service helpers without a server: tokenizer round trip, mixed-option batches, streaming,
schemas. The model is a tiny fixed-weight Translator, scripted like the served artifact."""

from __future__ import annotations

import asyncio
import functools
import json

import pytest
import torch
from pydantic import ValidationError

from models.translate import EOS_ID, SPECIAL_TOKENS, TranslateConfig, Translator
from services.errors import ServiceError
from services.schemas.translate import (
    MAX_BEAM_SIZE,
    MAX_LENGTH,
    MAX_TEXT_CHARS,
    TRANSLATE_EXAMPLE,
    TRANSLATE_SINGLE_EXAMPLE,
    TranslateItem,
    TranslateRequest,
    TranslateStreamRequest,
)
from services.translate import Codec, Limits, TranslateDecoder, group_by_options, sse_frame, translate
from training.export import script
from training.train_translate import normalize, split_of, train_tokenizer

ENGLISH = ["Where is the station?", "I love dogs.", "Tom didn't eat the cake!", "We are men.",
           "It's cold in winter, isn't it?", "Go away."] * 3
SPANISH = ["¿Dónde está la estación?", "Me encantan los perros.", "¡Tom no se comió el pastel!",
           "Somos hombres.", "Hace frío en invierno, ¿verdad?", "Vete. Ñandú, pingüino, camión."] * 3
TEXTS = ["I love dogs.", "Where is the cake?", "A naïve café owner 😀 ate 東京 sushi.", "Go."]


@functools.cache
def codec() -> Codec:
    source = train_tokenizer(ENGLISH, vocab_size=300, min_frequency=1)
    target = train_tokenizer(SPANISH, vocab_size=300, min_frequency=1)
    return Codec({"src_tokenizer": source.to_str(), "tgt_tokenizer": target.to_str(),
                  "special_tokens": list(SPECIAL_TOKENS)})


@functools.cache
def scripted_model() -> torch.jit.ScriptModule:
    torch.manual_seed(3)
    tokens = codec()
    model = Translator(TranslateConfig(
        src_vocab_size=tokens.source.get_vocab_size(), tgt_vocab_size=tokens.target.get_vocab_size(),
        embedding_dim=8, encoder_hidden_size=6, decoder_hidden_size=10, max_output_length=20,
    ))
    with torch.no_grad():  # with this seed, one of TEXTS ends at once and the others run to the cap
        model.output.bias[EOS_ID] += 1.0
    return script(model)


@pytest.mark.parametrize("text", [*SPANISH[:6], "ÁÉÍÓÚ áéíóú ü ñ Ñ ¿? ¡!", "Zoë’s 😀 — 東京 «x»"])
def test_subwords_round_trip_case_punctuation_accents_and_unseen_characters(text):
    tokens = codec()
    ids = tokens.target.encode(text).ids
    assert 1 not in ids  # never <unk>: every byte is in the base alphabet
    assert tokens.decode(ids) == text


def test_normalize_keeps_accents_and_composes_them():
    assert normalize("  ¿Qué\tpasa,  señor? ") == "¿Qué pasa, señor?"
    assert normalize("n\u0303") == "ñ"  # decomposed n + combining tilde -> one character


def test_split_is_by_english_sentence_and_deterministic():
    assert split_of("I love dogs.", 30, 20) == split_of("I love dogs.", 30, 20)
    counts = {"train": 0, "dev": 0, "test": 0}
    for index in range(4000):
        counts[split_of(f"sentence {index}", 30, 20)] += 1
    assert 60 < counts["test"] < 180 and 30 < counts["dev"] < 130


def test_mixed_option_batch_equals_each_item_alone():
    model, tokens = scripted_model(), codec()
    items = [
        TranslateItem(text=TEXTS[0], beam_size=1, max_length=MAX_LENGTH),
        TranslateItem(text=TEXTS[1], beam_size=4, max_length=5, return_attention=True),
        TranslateItem(text=TEXTS[2], beam_size=1, max_length=3, return_attention=True),
        TranslateItem(text=TEXTS[3], beam_size=4, max_length=MAX_LENGTH, length_penalty=0.0),
        TranslateItem(text=TEXTS[2], beam_size=8, max_length=MAX_LENGTH),
        TranslateItem(text=TEXTS[0], beam_size=1, max_length=MAX_LENGTH, return_attention=True),
    ]
    batched = translate(model, tokens, items)
    assert len(batched) == len(items)
    for item, result in zip(items, batched, strict=True):
        (alone,) = translate(model, tokens, [item])
        assert result.translation == alone.translation
        assert result.output_tokens == alone.output_tokens <= item.max_length
        assert result.beam_size == item.beam_size
        assert result.score == pytest.approx(alone.score, abs=1e-4)
        assert (result.attention is not None) == item.return_attention
        if item.return_attention:
            assert len(result.attention) == result.output_tokens == len(result.output_pieces)
            assert all(len(row) == result.input_tokens == len(result.source_pieces)
                       for row in result.attention)
            for row, alone_row in zip(result.attention, alone.attention, strict=True):
                assert sum(row) == pytest.approx(1.0, abs=1e-4)
                assert row == pytest.approx(alone_row, abs=1e-5)
    assert batched[0].translation == batched[5].translation  # same text, same options


def test_group_by_options_ignores_length_penalty_for_greedy():
    items = [TranslateItem(text="a", beam_size=1, length_penalty=0.2),
             TranslateItem(text="b", beam_size=1, length_penalty=1.5),
             TranslateItem(text="c", beam_size=2, length_penalty=0.2),
             TranslateItem(text="d", beam_size=2, length_penalty=1.5)]
    assert sorted(group_by_options(items).values()) == [[0, 1], [2], [3]]


@functools.cache
def translator() -> TranslateDecoder:
    """The tiny model behind a running decode loop (a daemon thread), as the service has it."""
    return TranslateDecoder(scripted_model(), codec(), Limits(1000, 10**6, 10**6), max_rows=64, max_queue=64,
                      deadline_s=60)


def stream_tokens(model, tokens, text: str, max_length: int) -> list[dict]:
    """Every event of one stream through the shared loop."""
    assert model is scripted_model() and tokens is codec()

    async def collect() -> list[dict]:
        return [event async for event in translator().stream(text, max_length)]

    return asyncio.run(collect())


@pytest.mark.parametrize("max_length", [1, 4, MAX_LENGTH])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_assembles_the_same_text_as_the_greedy_call(text, max_length):
    model, tokens = scripted_model(), codec()
    events = list(stream_tokens(model, tokens, text, max_length))
    *deltas, done = events
    assert done["done"] is True and all("delta" in event for event in deltas)
    assert "".join(event["delta"] for event in deltas) == done["translation"]
    (greedy,) = translate(model, tokens, [TranslateItem(text=text, beam_size=1, max_length=max_length)])
    assert done["translation"] == greedy.translation
    assert done["output_tokens"] == greedy.output_tokens
    assert done["truncated"] == greedy.truncated
    assert done["score"] == pytest.approx(greedy.score, abs=1e-4)


def test_concurrent_streams_share_steps_and_each_equals_its_greedy_answer():
    texts = TEXTS * 4

    async def collect(text: str) -> list[dict]:
        return [event async for event in translator().stream(text, MAX_LENGTH)]

    async def all_streams() -> list[list[dict]]:
        return await asyncio.gather(*(collect(text) for text in texts))

    scheduler = translator().scheduler
    steps_before = scheduler.steps
    streams = asyncio.run(all_streams())
    shared_steps = scheduler.steps - steps_before
    for text, events in zip(texts, streams, strict=True):
        alone = stream_tokens(scripted_model(), codec(), text, MAX_LENGTH)
        assert events[:-1] == alone[:-1]  # the same deltas, token for token
        assert events[-1] == {**alone[-1], "score": pytest.approx(alone[-1]["score"], abs=1e-4)}
    # 16 streams of up to 20 tokens: far fewer steps than 16 separate loops would take.
    assert shared_steps < sum(e[-1]["decode_steps"] for e in streams)


def test_the_tiny_model_gives_empty_and_long_outputs_so_the_stream_tests_mean_something():
    results = translate(scripted_model(), codec(), [TranslateItem(text=t, beam_size=1) for t in TEXTS])
    lengths = {r.output_tokens for r in results}
    assert 0 in lengths and max(lengths) == 20
    # Random byte-level subwords include partial UTF-8 characters: the stream must hold them back.
    assert any("\ufffd" in r.translation for r in results)


def test_sse_frames_are_ascii_json_events():
    frame = sse_frame({"delta": "¿Dónde está? 😀"})
    assert frame.isascii() and frame.startswith("data: ") and frame.endswith("\n\n")
    assert json.loads(frame[len("data: "):]) == {"delta": "¿Dónde está? 😀"}


def test_examples_are_valid_requests_and_carry_options_to_every_item():
    request = TranslateRequest.model_validate(TRANSLATE_EXAMPLE)
    items = request.items()
    assert [i.text for i in items] == TRANSLATE_EXAMPLE["texts"]
    assert {i.beam_size for i in items} == {TRANSLATE_EXAMPLE["beam_size"]}
    assert TranslateRequest.model_validate(TRANSLATE_SINGLE_EXAMPLE).items()[0].beam_size == 4


BAD = [
    ({"text": ""}, "empty"),
    ({"text": "   "}, "empty"),
    ({"text": "a" * (MAX_TEXT_CHARS + 1)}, f"at most {MAX_TEXT_CHARS} characters"),
    ({"text": "hi", "beam_size": 0}, "greater than or equal to 1"),
    ({"text": "hi", "beam_size": MAX_BEAM_SIZE + 1}, f"less than or equal to {MAX_BEAM_SIZE}"),
    ({"text": "hi", "max_length": 0}, "greater than or equal to 1"),
    ({"text": "hi", "max_length": MAX_LENGTH + 1}, f"less than or equal to {MAX_LENGTH}"),
    ({"text": "hi", "beam_size": "4"}, "valid integer"),
    ({"text": "hi", "beam_size": 2.5}, "valid integer"),
    ({"text": "hi", "return_attention": "yes"}, "valid boolean"),
    ({"text": 7}, "valid string"),
    ({"texts": []}, "at least 1 item"),
    ({"text": "a", "texts": ["b"]}, "exactly one of"),
    ({"text": "hi", "target": "fr"}, "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_requests_fail_validation_naming_the_limit(body, message):
    with pytest.raises(ValidationError, match=message):
        TranslateRequest.model_validate(body)


def test_stream_request_limits():
    with pytest.raises(ValidationError, match="less than or equal to"):
        TranslateStreamRequest.model_validate({"text": "hi", "max_length": MAX_LENGTH + 1})
    with pytest.raises(ValidationError, match="Extra inputs"):
        TranslateStreamRequest.model_validate({"text": "hi", "beam_size": 4})


# Issue 13, findings 4 and 6: limits that depend on the tokenizer, checked before anything is queued.


def limited(max_source_tokens: int = 1000, max_request_work: int = 10**6,
            max_attention_cells: int = 10**6) -> TranslateDecoder:
    return TranslateDecoder(scripted_model(), codec(), Limits(max_source_tokens, max_request_work,
                                                              max_attention_cells),
                            max_rows=8, max_queue=8, deadline_s=60, start=False)


def test_items_name_their_field_for_limit_errors():
    assert [i.field for i in TranslateRequest.model_validate({"texts": ["a", "b"]}).items()] == [
        "texts[0]", "texts[1]"]
    assert TranslateRequest.model_validate({"text": "a"}).items()[0].field == "text"


def test_source_tokens_per_text_at_and_past_the_limit():
    emoji = "😀" * 5  # 5 characters, 20 byte-level tokens: characters alone bound nothing
    tokens = len(codec().encode([emoji])[0])
    assert tokens >= 4 * 5
    items = TranslateRequest.model_validate({"texts": ["Go.", emoji]}).items()
    limited(max_source_tokens=tokens).prepare(items)  # at the edge: accepted
    with pytest.raises(ServiceError) as refused:
        limited(max_source_tokens=tokens - 1).prepare(items)
    error = refused.value
    assert error.status == 400 and error.field == "texts[1]"
    assert f"has {tokens} subword tokens; the limit is {tokens - 1}" in error.message
    assert "MAX_SOURCE_TOKENS" in error.message


def test_decoder_work_per_request_at_and_past_the_limit():
    texts = ["I love dogs.", "Where is the cake?", "Go."]
    items = TranslateRequest.model_validate({"texts": texts, "beam_size": 4}).items()
    work = sum(len(ids) * 4 for ids in codec().encode(texts))
    limited(max_request_work=work).prepare(items)
    with pytest.raises(ServiceError) as refused:
        limited(max_request_work=work - 1).prepare(items)
    error = refused.value
    assert error.status == 400 and error.field == "texts[2]"  # the text that crossed the limit
    assert f"more than {work - 1:,} units of decoder work" in error.message and "beam_size" in error.message


def test_attention_cells_per_request_at_and_past_the_limit():
    texts = ["I love dogs.", "Where is the cake?"]
    body = {"texts": texts, "beam_size": 1, "max_length": 7, "return_attention": True}
    items = TranslateRequest.model_validate(body).items()
    cells = sum(7 * len(ids) for ids in codec().encode(texts))
    limited(max_attention_cells=cells).prepare(items)
    limited(max_attention_cells=1).prepare(TranslateRequest.model_validate(  # off: no attention bound
        {**body, "return_attention": False}).items())
    with pytest.raises(ServiceError) as refused:
        limited(max_attention_cells=cells - 1).prepare(items)
    error = refused.value
    assert error.status == 400 and error.field == "return_attention"
    assert f"could return {cells:,} attention cells" in error.message
    assert f"the limit is {cells - 1:,}" in error.message


def test_the_artifact_limit_is_the_default_source_token_limit():
    assert Limits.from_settings({"max_input_tokens": 100}).max_source_tokens == 100
