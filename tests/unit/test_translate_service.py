"""Translation service helpers without a server: tokenizer round trip, mixed-option batches, streaming,
schemas. The model is a tiny fixed-weight Translator, scripted like the served artifact."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from pydantic import ValidationError

from models.translate import EOS_ID, SPECIAL_TOKENS, TranslateConfig, Translator
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
from services.translate import Codec, group_by_options, sse_frame, stream_tokens, translate
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


def test_stream_survives_being_advanced_from_a_new_thread_at_every_step():
    # BentoML calls next() on a sync generator in whichever worker thread is free; inference mode is
    # thread-local, so the stream must not rely on a mode entered in an earlier step's thread.
    import threading

    model, tokens = scripted_model(), codec()
    text = max(TEXTS, key=len)
    generator = stream_tokens(model, tokens, text, MAX_LENGTH)
    events: list = []
    while not events or "done" not in events[-1]:
        box: list = []
        worker = threading.Thread(target=lambda box=box: box.append(next(generator)))
        worker.start()
        worker.join()
        assert box, "the step raised in its thread (see the thread's traceback above)"
        events.append(box[0])
    assert events == list(stream_tokens(model, tokens, text, MAX_LENGTH))


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
