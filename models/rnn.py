"""Recurrent building blocks shared by every model family."""

from __future__ import annotations

import torch
from torch import nn

# The three cells the project supports everywhere. ``rnn_tanh`` is the Elman RNN of the source notes:
# h_t = tanh(W_x x_t + W_h h_{t-1} + b). GRU and LSTM add gates that keep gradients alive over long
# spans (Hochreiter & Schmidhuber 1997; Cho et al. 2014).
CELLS = ("rnn_tanh", "gru", "lstm")


def make_rnn(
    cell: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """Builds a ``batch_first`` recurrent layer of the named cell.

    Args:
        cell: one of ``CELLS``.
        input_size: features per time step.
        hidden_size: hidden units per direction.
        num_layers: stacked layers.
        bidirectional: run a second layer over the reversed sequence.
        dropout: dropout between stacked layers (ignored when ``num_layers == 1``).
    """
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)}")
    kwargs = dict(
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        bidirectional=bidirectional,
        dropout=dropout if num_layers > 1 else 0.0,
        batch_first=True,
    )
    if cell == "lstm":
        return nn.LSTM(**kwargs)
    if cell == "gru":
        return nn.GRU(**kwargs)
    return nn.RNN(nonlinearity="tanh", **kwargs)


def pad_sequences(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads token-id lists into one batch.

    Shape:
        output: tokens (B, T) int64 with T = the longest length, lengths (B,) int64.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every sequence needs at least one token")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return tokens, lengths
