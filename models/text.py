"""Deterministic word tokenizer and vocabulary, shared by training and serving.

SST-2 ships pre-tokenised, lower-cased text in the Penn Treebank style ("it 's", "does n't"). Users send
ordinary English ("It's", "doesn't"), so this tokenizer splits clitics and punctuation the same way,
which keeps the vocabulary of the training data usable on raw input.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

_CLITICS = re.compile(r"(?i)\b(\w+)(n't)\b|\b(\w+)('s|'re|'ve|'d|'ll|'m)\b")
_TOKEN = re.compile(r"n't|'s|'re|'ve|'d|'ll|'m|[\w]+(?:[-'][\w]+)*|[^\w\s]")


def _split_clitic(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return f"{match.group(1)} {match.group(2)}"
    return f"{match.group(3)} {match.group(4)}"


def tokenize(text: str) -> list[str]:
    """Splits ``text`` into lower-cased word and punctuation tokens.

    >>> tokenize("It's not the movie I'd hoped for, isn't it?")
    ['it', "'s", 'not', 'the', 'movie', 'i', "'d", 'hoped', 'for', ',', 'is', "n't", 'it', '?']
    """
    text = text.lower().replace("\u2019", "'").replace("`", "'")
    text = _CLITICS.sub(_split_clitic, text)
    return _TOKEN.findall(text)


def build_vocab(texts: Iterable[str], min_freq: int = 1, max_size: int | None = None) -> list[str]:
    """Returns the vocabulary as a list of tokens, index = id.

    Order is deterministic: specials first, then by descending count, ties broken alphabetically.
    """
    counts = Counter(token for text in texts for token in tokenize(text))
    kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
    if max_size is not None:
        kept = kept[: max_size - 2]
    return [PAD, UNK, *kept]


class Vocab:
    """Maps tokens to ids; unknown tokens map to ``<unk>``."""

    def __init__(self, itos: list[str]):
        if itos[:2] != [PAD, UNK]:
            raise ValueError("vocabulary must start with <pad>, <unk>")
        self.itos = list(itos)
        self.stoi = {token: index for index, token in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; may be empty when the text holds no tokens."""
        return [self.stoi.get(token, UNK_ID) for token in tokenize(text)]
