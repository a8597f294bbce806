"""Sentiment classifier: embedding -> recurrent encoder -> pooled features -> class logits.

Many-to-one: a whole sentence in, one label out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.rnn import CELLS, make_rnn
from models.text import PAD_ID


@dataclass(frozen=True)
class SentimentConfig:
    vocab_size: int
    embedding_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    cell: str = "lstm"
    bidirectional: bool = True
    dropout: float = 0.5
    num_classes: int = 2

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class SentimentRNN(nn.Module):
    """Embeds token ids, runs a packed RNN, and classifies the pooled sequence.

    The sentence feature concatenates the last valid output of each direction with a max-pool over
    the valid time steps; max-pooling gives the classifier direct access to strong words anywhere
    in a long sentence (Conneau et al. 2017, InferSent). Padding never reaches the RNN (it is packed)
    nor the pool (it is masked), so a sentence's logits do not depend on what it is batched with.
    """

    def __init__(self, config: SentimentConfig):
        super().__init__()
        self.num_directions = 2 if config.bidirectional else 1
        self.hidden_size = config.hidden_size
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(config.dropout)
        self.rnn = make_rnn(
            config.cell,
            config.embedding_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            bidirectional=config.bidirectional,
            dropout=config.dropout,
        )
        feature_size = 2 * self.num_directions * config.hidden_size
        self.head = nn.Linear(feature_size, config.num_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Returns class logits.

        Shape:
            tokens: (B, T) int64, padded with ``PAD_ID``.
            lengths: (B,) int64, each in 1..T.
            output: (B, num_classes).
        """
        batch_size, max_len = tokens.shape
        embedded = self.dropout(self.embedding(tokens))  # (B, T, E)
        packed = pack_padded_sequence(
            embedded, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        packed_out, _ = self.rnn(packed)
        outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=max_len)
        # (B, T, D*H)
        outputs = outputs.view(batch_size, max_len, self.num_directions, self.hidden_size)
        last_index = (lengths - 1).to(tokens.device).view(batch_size, 1, 1, 1)
        last_index = last_index.expand(batch_size, 1, 1, self.hidden_size)
        forward_last = outputs[:, :, 0:1, :].gather(1, last_index).view(batch_size, self.hidden_size)
        # The forward direction ends at the last valid step, the backward one at step 0.
        finals = [forward_last]
        if self.num_directions == 2:
            finals.append(outputs[:, 0, 1, :])
        outputs = outputs.view(batch_size, max_len, self.num_directions * self.hidden_size)
        steps = torch.arange(max_len, device=tokens.device).view(1, max_len, 1)
        valid = steps < lengths.to(tokens.device).view(batch_size, 1, 1)  # (B, T, 1)
        pooled = outputs.masked_fill(~valid, float("-inf")).max(dim=1).values  # (B, D*H)
        finals.append(pooled)
        features = torch.cat(finals, dim=1)  # (B, 2*D*H)
        return self.head(self.dropout(features))
