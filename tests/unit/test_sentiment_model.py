"""The sentiment model on tiny fixed-weight instances: shapes, packing, batching, TorchScript."""

import pytest
import torch

from models.rnn import CELLS, pad_sequences
from models.sentiment import SentimentConfig, SentimentRNN
from training.export import script

SEQUENCES = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 2], [4], [3, 3, 3, 3, 3]]


def tiny_model(cell: str, bidirectional: bool) -> SentimentRNN:
    torch.manual_seed(0)
    config = SentimentConfig(vocab_size=20, embedding_dim=8, hidden_size=6, cell=cell,
                             bidirectional=bidirectional, dropout=0.0)
    return SentimentRNN(config).eval()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_logit_shape(cell, bidirectional):
    tokens, lengths = pad_sequences(SEQUENCES)
    assert tiny_model(cell, bidirectional)(tokens, lengths).shape == (len(SEQUENCES), 2)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_mixed_length_batch_equals_single_calls(cell, bidirectional):
    model = tiny_model(cell, bidirectional)
    tokens, lengths = pad_sequences(SEQUENCES)
    with torch.no_grad():
        batched = model(tokens, lengths)
        singles = torch.cat([model(*pad_sequences([s])) for s in SEQUENCES])
    torch.testing.assert_close(batched, singles, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_padding_never_changes_a_result(cell):
    model = tiny_model(cell, True)
    tokens, lengths = pad_sequences(SEQUENCES)
    extra = torch.cat([tokens, torch.full((len(SEQUENCES), 9), 7)], dim=1)  # garbage after the end
    with torch.no_grad():
        torch.testing.assert_close(model(extra, lengths), model(tokens, lengths))


def test_padding_positions_are_packed_away():
    # Same sentences with a different padding token value: packing means it is never read.
    model = tiny_model("gru", True)
    tokens, lengths = pad_sequences(SEQUENCES, pad_id=0)
    other, _ = pad_sequences(SEQUENCES, pad_id=13)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, lengths), model(other, lengths))


@pytest.mark.parametrize("cell", CELLS)
def test_torchscript_equals_eager(cell):
    model = tiny_model(cell, True)
    scripted = script(model)
    tokens, lengths = pad_sequences(SEQUENCES)
    with torch.no_grad():
        torch.testing.assert_close(scripted(tokens, lengths), model(tokens, lengths))


def test_unknown_cell_is_rejected():
    with pytest.raises(ValueError, match="cell must be one of"):
        SentimentConfig(vocab_size=10, cell="transformer")
