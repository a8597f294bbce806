"""The service's pure helpers: encode -> collate -> predict -> split, without a server."""

import pytest
import torch
from pydantic import ValidationError

from models.sentiment import SentimentConfig, SentimentRNN
from models.text import Vocab, build_vocab
from services.batching import collate, padding_ratio, split
from services.errors import ServiceError
from services.schemas.sentiment import MAX_ITEMS, MAX_TEXT_CHARS, SentimentRequest
from services.sentiment import classify, encode

TEXTS = ["a truly great film", "bad", "the plot is thin but the acting is great and warm", "great"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vocab = Vocab(build_vocab(TEXTS))
    model = SentimentRNN(SentimentConfig(vocab_size=len(vocab), embedding_dim=8, hidden_size=6,
                                         dropout=0.0)).eval()
    return model, vocab, ["negative", "positive"]


def test_collate_sorts_longest_first_and_split_restores_order():
    sequences = [[1, 2], [3, 4, 5, 6], [7], [8, 9, 10]]
    tokens, lengths, order = collate(sequences, "test")
    assert tokens.shape == (4, 4)
    assert lengths.tolist() == [4, 3, 2, 1]
    assert [sequences[i] for i in order] == [[3, 4, 5, 6], [8, 9, 10], [1, 2], [7]]
    assert split(["d", "c", "b", "a"], order) == ["b", "d", "a", "c"]


def test_padding_ratio():
    assert padding_ratio(torch.tensor([4, 4])) == 0.0
    assert padding_ratio(torch.tensor([4, 2, 2, 0])) == pytest.approx(0.5)


def test_batched_classify_equals_single_calls_in_request_order(tiny):
    model, vocab, labels = tiny
    encoded = encode(vocab, TEXTS, max_tokens=16)
    batched = classify(model, labels, encoded)
    singles = [classify(model, labels, [ids])[0] for ids in encoded]
    assert [r.tokens for r in batched] == [4, 1, 11, 1]
    for one, many in zip(singles, batched, strict=True):
        assert one.label == many.label
        assert one.score == pytest.approx(many.score, abs=1e-6)
        assert sum(many.probabilities.values()) == pytest.approx(1.0, abs=1e-6)


def test_request_accepts_one_text_or_a_list():
    assert SentimentRequest.model_validate({"text": "fine"}).items() == ["fine"]
    assert SentimentRequest.model_validate({"texts": ["a", "b"]}).items() == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": "   "}, "empty or only whitespace"),
        ({"texts": ["ok", ""]}, "empty or only whitespace"),
        ({"texts": ["ok", 3]}, "valid string"),
        ({"texts": []}, "at least 1 item"),
        ({"texts": ["a"] * (MAX_ITEMS + 1)}, f"at most {MAX_ITEMS} items"),
        ({"text": "x" * (MAX_TEXT_CHARS + 1)}, f"at most {MAX_TEXT_CHARS} characters"),
        ({}, "exactly one of"),
        ({"text": "a", "texts": ["b"]}, "exactly one of"),
        ({"text": "a", "lang": "en"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_rejected_with_the_limit(body, message):
    with pytest.raises(ValidationError, match=message):
        SentimentRequest.model_validate(body)


def test_tokens_are_counted_once_against_the_models_limit_and_the_400_names_the_item(tiny):
    _, vocab, _ = tiny
    assert [len(ids) for ids in encode(vocab, ["great film", "bad " * 5], max_tokens=5)] == [2, 5]
    with pytest.raises(ServiceError) as raised:
        encode(vocab, ["fine", "bad " * 6], max_tokens=5)
    error = raised.value
    assert (error.status, error.field) == (400, "texts[1]")
    assert "6 tokens; the limit is 5" in error.message
    with pytest.raises(ServiceError, match="no word or punctuation token") as raised:
        encode(vocab, [""], max_tokens=5, field_of=lambda _: "text")
    assert raised.value.field == "text"
