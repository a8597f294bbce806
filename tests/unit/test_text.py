import pytest

from models.text import PAD, UNK, UNK_ID, Vocab, build_vocab, tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("It's great!", ["it", "'s", "great", "!"]),
        ("I don't like it", ["i", "do", "n't", "like", "it"]),
        ("a well-made , moving film", ["a", "well-made", ",", "moving", "film"]),
        ("  spaced\tout \n", ["spaced", "out"]),
        ("It\u2019s curly", ["it", "'s", "curly"]),
        ("", []),
    ],
)
def test_tokenize_matches_sst_conventions(text, tokens):
    assert tokenize(text) == tokens


def test_vocab_is_deterministic_and_ordered_by_count():
    texts = ["b a a", "c b a"]
    assert build_vocab(texts) == [PAD, UNK, "a", "b", "c"]
    assert build_vocab(list(reversed(texts))) == build_vocab(texts)
    assert build_vocab(texts, min_freq=2) == [PAD, UNK, "a", "b"]


def test_unknown_words_map_to_unk():
    vocab = Vocab(build_vocab(["good film"]))
    assert vocab.encode("good zxqv film") == [vocab.stoi["good"], UNK_ID, vocab.stoi["film"]]


def test_vocab_requires_specials_first():
    with pytest.raises(ValueError, match="<pad>, <unk>"):
        Vocab(["a", PAD, UNK])
