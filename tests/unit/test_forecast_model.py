"""The forecaster's model family on tiny fixed-weight models: shapes, quantiles, and the streaming
contract (one-bar ``step`` calls equal one ``sequence`` pass), eager and TorchScript, for every cell."""

from __future__ import annotations

import math

import pytest
import torch

from models.forecast import FEATURES, ForecastConfig, ForecastRNN, bar_features, pinball_loss
from models.rnn import CELLS
from training.export import script


def tiny(cell: str, num_layers: int = 1) -> ForecastRNN:
    torch.manual_seed(7)
    model = ForecastRNN(ForecastConfig(hidden_size=6, num_layers=num_layers, cell=cell, horizons=3,
                                       dropout=0.0))
    model.set_normalisation(torch.randn(len(FEATURES)) * 0.01, torch.rand(len(FEATURES)) + 0.5, 0.03)
    model.horizon_offsets[:, 0] = -0.001
    model.horizon_offsets[:, 2] = 0.002
    return model.eval()


def features(batch: int, steps: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, len(FEATURES), generator=generator) * 0.03  # (B, T, F)


@pytest.fixture(scope="module", params=[(c, 1) for c in CELLS] + [("lstm", 2)],
                ids=lambda p: f"{p[0]}-{p[1]}layer")
def models(request):
    model = tiny(*request.param)
    return model, script(model)


def test_bar_features_are_log_ratios():
    out = bar_features(100.0, 1000.0, open_=101.0, high=110.0, low=99.0, close=105.0, volume=2000.0)
    assert out == pytest.approx([math.log(1.05), math.log(110 / 99), math.log(105 / 101),
                                 math.log(1.01), math.log1p(2000) - math.log1p(1000)])


def test_config_rejects_bad_cells_and_quantiles():
    with pytest.raises(ValueError, match="cell"):
        ForecastConfig(cell="transformer")
    with pytest.raises(ValueError, match=r"include 0\.5"):
        ForecastConfig(quantiles=(0.1, 0.9))
    with pytest.raises(ValueError, match="increasing"):
        ForecastConfig(quantiles=(0.5, 0.1))


def test_pinball_loss_weights_under_and_over_prediction_by_the_level():
    levels = torch.tensor([0.1, 0.9])
    # target 1 above a prediction of 0: the 0.9 quantile pays 0.9, the 0.1 quantile 0.1.
    assert float(pinball_loss(torch.zeros(1, 2), torch.ones(1), levels)) == pytest.approx(0.5)
    assert float(pinball_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([-1.0]), levels)) == pytest.approx(0.5)


def test_many_to_one_shapes_ordering_and_offsets(models):
    eager, scripted = models
    x = features(4, 12)
    with torch.no_grad():
        out = scripted(x)
    assert out.shape == (4, 3, 3)  # (B, H, Q)
    assert (out[..., 1:] >= out[..., :-1]).all(), "quantiles must not cross"
    torch.testing.assert_close(out, eager(x))
    eager.horizon_offsets.zero_()
    with torch.no_grad():
        raw = eager(x)
    eager.horizon_offsets[:, 0], eager.horizon_offsets[:, 2] = -0.001, 0.002
    torch.testing.assert_close(out[..., 0], raw[..., 0] - 0.001)
    torch.testing.assert_close(out[..., 1], raw[..., 1])


def test_streaming_steps_equal_one_sequence_pass(models):
    """The session contract: N one-bar steps give the same forecasts and state as one pass."""
    _, scripted = models
    x = features(1, 25, seed=3)
    with torch.no_grad():
        at_once, final_state = scripted.sequence(x, scripted.initial_state(1))  # (1, N, Q)
        state = scripted.initial_state(1)
        streamed = []
        for t in range(x.shape[1]):
            quantiles, state = scripted.step(x[:, t], state)
            streamed.append(quantiles)
    torch.testing.assert_close(torch.stack(streamed, dim=1), at_once)
    torch.testing.assert_close(state, final_state)


def test_state_is_one_tensor_with_lstm_cell_stacked(models):
    eager, scripted = models
    state = scripted.initial_state(5)
    layers = eager.num_layers * (2 if isinstance(eager.encoder.rnn, torch.nn.LSTM) else 1)
    assert state.shape == (layers, 5, 6)


def test_batched_step_equals_one_stream_at_a_time(models):
    """Many sessions in one step call: each row equals that session stepped alone."""
    _, scripted = models
    warm = features(3, 7, seed=5)
    new_bars = features(3, 1, seed=6)[:, 0]  # (B, F)
    with torch.no_grad():
        # Three sessions with different histories (7, 4 and 1 bars) so their states differ.
        states = [scripted.sequence(warm[i:i + 1, : 7 - 3 * i], scripted.initial_state(1))[1]
                  for i in range(3)]
        batched_q, batched_state = scripted.step(new_bars, torch.cat(states, dim=1))
        for i in range(3):
            single_q, single_state = scripted.step(new_bars[i:i + 1], states[i])
            torch.testing.assert_close(batched_q[i:i + 1], single_q)
            torch.testing.assert_close(batched_state[:, i:i + 1], single_state)


def test_normalisation_is_part_of_the_module(models):
    eager, _ = models
    x = features(2, 5)
    with torch.no_grad():
        before = eager(x)
        eager.feature_mean += 1.0
        after = eager(x)
        eager.feature_mean -= 1.0
    assert not torch.allclose(before, after)
