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


def state_layers(cell: str, num_layers: int = 1) -> int:
    """Rows of ``StatefulRNN``'s state per sequence: ``2 * num_layers`` for an LSTM (h and c), else
    ``num_layers``. For sizing a projection built before the layer (construction order fixes the
    random initialisation a seed gives)."""
    return num_layers * (2 if cell == "lstm" else 1)


class StatefulRNN(nn.Module):
    """A ``batch_first`` RNN, GRU or LSTM that carries its recurrent state as ONE tensor.

    This is the project's one convention for state that outlives a call (forecast sessions, decoder
    steps, beams): an LSTM's h and c are stacked on dim 0, h's layers first, so every cell has the
    same state type and TorchScript compiles one signature (the idea of ``init_hidden`` in
    pytorch/examples ``word_language_model``, without the tuple). Rows of the state are
    independent, so beams and sessions reorder or join it with ``index_select``/``cat`` on dim 1.

    Shape:
        state: (S * num_layers, B, hidden_size) with S = 2 for an LSTM (``state[:num_layers]`` is h,
        ``state[num_layers:]`` is c) and S = 1 otherwise.
    """

    # Constants: TorchScript folds them, so it compiles only the branch of the chosen cell (an LSTM
    # call on a GRU would not type-check). ``flat_state_size`` is one row's state as a vector, the
    # input width of ``state_from_flat``.
    __constants__ = ("is_lstm", "num_layers", "hidden_size", "state_layers", "flat_state_size")

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0):
        """Builds the layer with ``make_rnn`` (unidirectional; see there for the arguments)."""
        super().__init__()
        self.is_lstm = cell == "lstm"
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.state_layers = state_layers(cell, num_layers)
        self.flat_state_size = self.state_layers * hidden_size
        self.rnn = make_rnn(cell, input_size, hidden_size, num_layers=num_layers, dropout=dropout)

    @torch.jit.export
    def initial_state(self, batch_size: int) -> torch.Tensor:
        """The zero state.

        Shape:
            output: (S * num_layers, B, hidden_size), on the weights' device and dtype.
        """
        weight = self.rnn.weight_hh_l0
        return torch.zeros(self.state_layers, batch_size, self.hidden_size, dtype=weight.dtype,
                           device=weight.device)

    @torch.jit.export
    def state_from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """A state from one vector per row (a learned initial state, e.g. projected encoder features).

        The vector is read as (S, num_layers, hidden_size) in row-major order: h of layer 0, h of
        layer 1, ..., then c of each layer for an LSTM.

        Shape:
            flat: (B, S * num_layers * hidden_size).
            output: (S * num_layers, B, hidden_size).
        """
        rows = flat.view(flat.shape[0], self.state_layers, self.hidden_size)  # (B, S*L, H)
        return rows.transpose(0, 1).contiguous()  # (S*L, B, H)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the layer over a whole sequence (one step is a sequence of length 1).

        Shape:
            inputs: (B, T, input_size); state: (S * num_layers, B, hidden_size).
            output: outputs (B, T, hidden_size) of the last layer, and the state after step T,
            (S * num_layers, B, hidden_size).
        """
        if self.is_lstm:
            hidden = state[: self.num_layers].contiguous()  # (L, B, H)
            cell = state[self.num_layers:].contiguous()  # (L, B, H)
            outputs, (hidden, cell) = self.rnn(inputs, (hidden, cell))
            return outputs, torch.cat([hidden, cell], dim=0)  # (2L, B, H)
        return self.rnn(inputs, state.contiguous())


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
