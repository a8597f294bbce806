"""Daily price forecaster: bar features -> recurrent encoder -> quantiles of future log returns.

One encoder, two heads:

* many-to-one (``forward``): a window of L bars gives quantiles of the cumulative log return
  ``log(close[t+h] / close[t])`` for every horizon h in 1..H;
* many-to-many (``sequence``/``step``, Tx = Ty): after every bar, quantiles of the next bar's log
  return. ``step`` advances the hidden state by one bar, which is what streaming sessions use; it
  runs the same recurrent layer as ``sequence``, so streaming N bars equals one pass over N bars.

The model works on raw features (``bar_features``) and returns raw log returns: the normalisation
statistics, fitted on the training period only, are buffers of the module (and copies sit in the
artifact metadata), and so are the split-conformal offsets fitted on the validation period.

The recurrent state is ONE tensor for every cell, in the convention of ``models.rnn.StatefulRNN``:
(S * layers, B, hidden) where S = 2 for an LSTM (h stacked on c) and 1 otherwise. Sessions export it
as is, so that layout is part of the service's contract.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from models.rnn import CELLS, StatefulRNN

# Features per bar, computed from the bar and the previous close/volume (see ``bar_features``).
FEATURES = ("log_return", "log_range", "log_body", "log_gap", "log_volume_change")


def bar_features(previous_close: float, previous_volume: float, open_: float, high: float, low: float,
                 close: float, volume: float) -> list[float]:
    """Scale-free features of one daily bar relative to the previous one.

    Prices must be positive and volume non-negative (validated upstream); log returns make TSLA's
    $1 (2010) and $400 (2024) bars look alike, which is why the model never sees a raw price.
    """
    return [
        math.log(close / previous_close),  # the quantity being forecast
        math.log(high / low),  # intraday range, a volatility proxy (Parkinson 1980)
        math.log(close / open_),
        math.log(open_ / previous_close),  # overnight gap
        math.log1p(volume) - math.log1p(previous_volume),
    ]


@dataclass(frozen=True)
class ForecastConfig:
    input_size: int = len(FEATURES)
    hidden_size: int = 32
    num_layers: int = 1
    cell: str = "gru"
    dropout: float = 0.1
    horizons: int = 5
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if list(self.quantiles) != sorted(set(self.quantiles)) or not all(
                0 < q < 1 for q in self.quantiles):
            raise ValueError(f"quantiles must be strictly increasing in (0, 1), got {self.quantiles}")
        if 0.5 not in self.quantiles:
            raise ValueError("quantiles must include 0.5 (the point forecast)")
        if self.horizons < 1:
            raise ValueError(f"horizons must be >= 1, got {self.horizons}")

    def to_dict(self) -> dict:
        return asdict(self)


def pinball_loss(predicted: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean quantile (pinball) loss (Koenker & Bassett 1978).

    Shape:
        predicted: (..., Q); target: (...) broadcast against it; quantiles: (Q,).
    """
    error = target.unsqueeze(-1) - predicted  # (..., Q)
    return torch.maximum(quantiles * error, (quantiles - 1) * error).mean()


class ForecastRNN(nn.Module):
    """Shared recurrent encoder with a many-to-one (horizons) and a many-to-many (next bar) head."""

    def __init__(self, config: ForecastConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_layers
        self.horizons = config.horizons
        self.num_quantiles = len(config.quantiles)
        self.encoder = StatefulRNN(config.cell, config.input_size, config.hidden_size,
                                   num_layers=config.num_layers, dropout=config.dropout)
        self.state_layers = self.encoder.state_layers
        self.dropout = nn.Dropout(config.dropout)
        self.horizon_head = nn.Linear(config.hidden_size, config.horizons * self.num_quantiles)
        self.next_head = nn.Linear(config.hidden_size, self.num_quantiles)
        # Normalisation (training period only) and split-conformal offsets (validation period).
        self.register_buffer("quantile_levels", torch.tensor(config.quantiles))
        self.register_buffer("feature_mean", torch.zeros(config.input_size))
        self.register_buffer("feature_std", torch.ones(config.input_size))
        self.register_buffer("target_scale", torch.ones(1))
        self.register_buffer("horizon_offsets", torch.zeros(config.horizons, self.num_quantiles))
        self.register_buffer("next_offsets", torch.zeros(self.num_quantiles))

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor, target_scale: float) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.target_scale.fill_(target_scale)

    def _quantiles(self, raw: torch.Tensor) -> torch.Tensor:
        """Non-crossing quantiles: the lowest is free, each next one adds a positive increment."""
        increments = F.softplus(raw[..., 1:])
        return torch.cumsum(torch.cat([raw[..., :1], increments], dim=-1), dim=-1) * self.target_scale

    def _normalise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std

    @torch.jit.export
    def initial_state(self, batch_size: int) -> torch.Tensor:
        """The zero state every sequence starts from. Shape: (S*layers, B, H)."""
        return self.encoder.initial_state(batch_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Many-to-one: calibrated quantiles of the cumulative log return for horizons 1..H.

        Shape:
            features: (B, L, F) raw bar features, oldest first.
            output: (B, H, Q), in log-return units.
        """
        state = self.initial_state(features.shape[0])
        outputs, _ = self.encoder(self._normalise(features), state)  # (B, L, H)
        last = self.dropout(outputs[:, -1])  # (B, H)
        raw = self.horizon_head(last).view(-1, self.horizons, self.num_quantiles)  # (B, H, Q)
        return self._quantiles(raw) + self.horizon_offsets

    @torch.jit.export
    def sequence(self, features: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Many-to-many: after every bar, calibrated quantiles of the next bar's log return.

        Shape:
            features: (B, T, F) raw bar features; state: (S*layers, B, H).
            output: quantiles (B, T, Q) and the state after the last bar (S*layers, B, H).
        """
        outputs, state = self.encoder(self._normalise(features), state)  # (B, T, H)
        quantiles = self._quantiles(self.next_head(self.dropout(outputs)))  # (B, T, Q)
        return quantiles + self.next_offsets, state

    @torch.jit.export
    def step(self, features: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advances B independent streams by one bar each.

        Shape:
            features: (B, F), one new bar per stream; state: (S*layers, B, H).
            output: next-bar quantiles (B, Q) and the new state (S*layers, B, H).
        """
        quantiles, state = self.sequence(features.unsqueeze(1), state)  # (B, 1, Q)
        return quantiles.squeeze(1), state
