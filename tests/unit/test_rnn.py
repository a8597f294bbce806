"""models.rnn.StatefulRNN: the one-tensor recurrent state every stateful model family uses."""

from __future__ import annotations

import pytest
import torch

from models.rnn import CELLS, StatefulRNN, state_layers
from training.export import script

INPUT_SIZE, HIDDEN_SIZE = 3, 5


def tiny(cell: str, num_layers: int) -> StatefulRNN:
    torch.manual_seed(0)
    return StatefulRNN(cell, INPUT_SIZE, HIDDEN_SIZE, num_layers=num_layers, dropout=0.3).eval()


def random_state(layer: StatefulRNN, batch_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layer.state_layers, batch_size, HIDDEN_SIZE, generator=generator)  # (S*L, B, H)


def inputs(batch_size: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, length, INPUT_SIZE, generator=generator)  # (B, T, I)


@pytest.fixture(params=[(cell, layers) for cell in CELLS for layers in (1, 2)],
                ids=lambda p: f"{p[0]}-{p[1]}layer")
def layers(request):
    """The eager layer and its TorchScript version: every check runs on both."""
    eager = tiny(*request.param)
    return eager, script(eager)


def test_state_shape_is_stacked_layers_by_batch_by_hidden(layers):
    eager = layers[0]
    expected_rows = eager.num_layers * (2 if eager.is_lstm else 1)
    assert eager.state_layers == state_layers("lstm" if eager.is_lstm else "gru", eager.num_layers)
    for module in layers:
        state = module.initial_state(4)
        assert state.shape == (expected_rows, 4, HIDDEN_SIZE)
        assert not state.any()
        with torch.no_grad():
            outputs, after = module(inputs(4, 6, seed=1), state)
        assert outputs.shape == (4, 6, HIDDEN_SIZE)
        assert after.shape == state.shape
    assert eager.flat_state_size == expected_rows * HIDDEN_SIZE


def test_scripted_equals_eager(layers):
    eager, scripted = layers
    x, state = inputs(3, 7, seed=2), random_state(eager, 3, seed=3)
    with torch.no_grad():
        expected, scripted_out = eager(x, state), scripted(x, state)
    torch.testing.assert_close(scripted_out[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(scripted_out[1], expected[1], rtol=0, atol=0)


def test_layout_matches_torch_hidden_then_cell_on_dim_0(layers):
    """state[:L] is torch's h_n (so state[L-1] is the top layer's last output); state[L:] is c_n."""
    eager = layers[0]
    x, state = inputs(2, 5, seed=4), random_state(eager, 2, seed=5)
    count = eager.num_layers
    with torch.no_grad():
        if eager.is_lstm:
            expected_outputs, (h, c) = eager.rnn(x, (state[:count].contiguous(), state[count:].contiguous()))
            expected_state = torch.cat([h, c], dim=0)
        else:
            expected_outputs, expected_state = eager.rnn(x, state)
        for module in layers:
            outputs, after = module(x, state)
            torch.testing.assert_close(outputs, expected_outputs, rtol=0, atol=0)
            torch.testing.assert_close(after, expected_state, rtol=0, atol=0)
            torch.testing.assert_close(after[count - 1], outputs[:, -1])


def test_batched_equals_one_sequence_at_a_time(layers):
    """Rows never interact: a batch with different states equals each row run alone."""
    eager = layers[0]
    x, state = inputs(4, 6, seed=6), random_state(eager, 4, seed=7)
    with torch.no_grad():
        for module in layers:
            outputs, after = module(x, state)
            for row in range(4):
                single_outputs, single_state = module(x[row:row + 1], state[:, row:row + 1])
                torch.testing.assert_close(outputs[row:row + 1], single_outputs)
                torch.testing.assert_close(after[:, row:row + 1], single_state)


def test_one_pass_equals_the_sequence_run_step_by_step(layers):
    """What streaming relies on: T one-step calls carrying the state equal one call over T steps."""
    x = inputs(3, 9, seed=8)
    with torch.no_grad():
        for module in layers:
            at_once, final_state = module(x, module.initial_state(3))
            state, stepped = module.initial_state(3), []
            for t in range(x.shape[1]):
                output, state = module(x[:, t:t + 1], state)  # (B, 1, H)
                stepped.append(output)
            torch.testing.assert_close(torch.cat(stepped, dim=1), at_once)
            torch.testing.assert_close(state, final_state)


def test_state_from_flat_reads_hidden_layers_then_cell_layers(layers):
    eager = layers[0]
    rows = eager.state_layers
    flat = torch.arange(2 * rows * HIDDEN_SIZE, dtype=torch.float32).view(2, rows * HIDDEN_SIZE)  # (B, S*L*H)
    for module in layers:
        state = module.state_from_flat(flat)
        assert state.shape == (rows, 2, HIDDEN_SIZE)
        assert state.is_contiguous()
        for row in range(2):
            for index in range(rows):  # h of layer 0, 1, ..., then (LSTM) c of layer 0, 1, ...
                expected = flat[row, index * HIDDEN_SIZE:(index + 1) * HIDDEN_SIZE]
                torch.testing.assert_close(state[index, row], expected, rtol=0, atol=0)


def test_unknown_cell_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="rnn_tanh, gru, lstm"):
        StatefulRNN("transformer", INPUT_SIZE, HIDDEN_SIZE)
