"""Trains the daily-return forecaster on a Yahoo-format CSV, calibrates it, exports and registers it.

    python -m training.train_forecast                              # TSLA, writes models/artifacts/forecast
    python -m training.train_forecast --dry-run                    # one batch, export, reload, register
    python -m training.train_forecast --csv-path my_ticker.csv --cell lstm --horizons 10

Both heads (many-to-one over horizons, many-to-many next bar) train jointly on the pinball loss of
their quantiles; the epoch with the lowest validation pinball loss is kept. The 80% interval is then
widened or narrowed by split-conformal calibration on the validation period (conformalised quantile
regression, Romano et al. 2019), and the test period is evaluated once, at the end.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.forecast import FEATURES, ForecastConfig, ForecastRNN, pinball_loss
from training.config import parse_config, to_dict
from training.export import export_and_reload, sha256_file
from training.forecast_data import (
    chronological_split,
    feature_matrix,
    horizon_targets,
    origins,
    read_yahoo_csv,
    windows,
)
from training.loop import fit, seed_everything

DATA = Path(__file__).parent / "data" / "stock"


@dataclass(frozen=True)
class TrainForecastConfig:
    csv_path: str = str(DATA / "TSLA.csv")
    ticker: str = "TSLA"
    out_dir: str = "models/artifacts/forecast"
    register: bool = True
    cell: str = "gru"
    hidden_size: int = 32
    num_layers: int = 1
    dropout: float = 0.1
    window: int = 60
    horizons: int = 5
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    interval: tuple[float, ...] = (0.1, 0.9)
    val_months: int = 18
    test_months: int = 12
    conformal: bool = True
    batch_size: int = 64
    epochs: int = 40
    lr: float = 2e-3
    weight_decay: float = 0.01
    clip_grad_norm: float = 1.0
    patience: int = 6
    seed: int = 1234
    threads: int = 1
    dry_run: bool = False


def conformal_offset(lower: np.ndarray, upper: np.ndarray, target: np.ndarray, coverage: float) -> float:
    """Split-conformal correction for an interval: widen (or, if negative, narrow) both ends by it.

    Conformity score E = max(lower - y, y - upper); the offset is its ceil((n+1)·coverage)/n
    empirical quantile, which gives >= ``coverage`` on exchangeable data (Romano et al. 2019).
    """
    scores = np.maximum(lower - target, target - upper)
    n = len(scores)
    level = min(1.0, np.ceil((n + 1) * coverage) / n)
    return float(np.quantile(scores, level, method="higher"))


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(TrainForecastConfig, argv, description=__doc__)
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    if tuple(config.interval) not in {(lo, hi) for lo in config.quantiles for hi in config.quantiles
                                      if lo < hi}:
        raise ValueError(f"interval {config.interval} must be two of the quantiles {config.quantiles}")

    bars = read_yahoo_csv(config.csv_path)
    features = feature_matrix(bars)
    split = chronological_split(bars, config.val_months, config.test_months)
    window, horizons = config.window, config.horizons
    sets = {}
    for period in ("train", "validation", "test"):
        origin = origins(split, len(bars), window, horizons, period)
        sets[period] = (origin, torch.from_numpy(windows(features, origin, window)),
                        torch.from_numpy(horizon_targets(bars.close, origin, horizons)).float())
    print(f"{config.ticker}: {len(bars)} bars, split {split.to_dict(bars)}; origins "
          + ", ".join(f"{k} {len(v[0])}" for k, v in sets.items()), flush=True)

    # Normalisation from training bars only (features 1 .. val_start-1; feature 0 has no previous bar).
    train_features = features[1:split.val_start]
    mean, std = train_features.mean(axis=0), train_features.std(axis=0)
    target_scale = float(train_features[:, 0].std())

    model_config = ForecastConfig(
        input_size=len(FEATURES), hidden_size=config.hidden_size, num_layers=config.num_layers,
        cell=config.cell, dropout=config.dropout, horizons=horizons, quantiles=config.quantiles,
    )
    model = ForecastRNN(model_config)
    model.set_normalisation(torch.from_numpy(mean), torch.from_numpy(std), target_scale)
    levels = torch.tensor(config.quantiles)
    # Many-to-many chunks: bars s .. s+window-1 of the training period, each predicting the next return.
    chunk_starts = np.arange(1, split.val_start - window)
    next_return = torch.from_numpy(np.append(features[1:, 0], np.nan)).float()  # next_return[i] = r[i+1]
    all_features = torch.from_numpy(features)
    rng = np.random.default_rng(config.seed)

    def train_batches(epoch: int):
        origin_count = len(sets["train"][0])
        order = rng.permutation(origin_count)
        for start in range(0, origin_count, config.batch_size):
            rows = order[start:start + config.batch_size]
            starts = rng.choice(chunk_starts, size=len(rows))
            index = torch.from_numpy(starts[:, None] + np.arange(window)[None, :])  # (B, T)
            yield (sets["train"][1][rows], sets["train"][2][rows], all_features[index], next_return[index])

    def loss_fn(model, batch):
        window_x, window_y, chunk_x, chunk_y = batch
        scale = model.target_scale
        horizon_loss = pinball_loss(model(window_x) / scale, window_y / scale, levels)
        next_q, _ = model.sequence(chunk_x, model.initial_state(len(chunk_x)))
        return horizon_loss + pinball_loss(next_q / scale, chunk_y / scale, levels)

    def predict(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, H, Q) horizon quantiles and (n, Q) next-bar quantiles, each from the window alone."""
        next_q, _ = model.sequence(x, model.initial_state(len(x)))
        return model(x), next_q[:, -1]

    def evaluate(model):
        _, x, y = sets["validation"]
        horizon_q, next_q = predict(model, x)
        scale = model.target_scale
        horizon_loss = float(pinball_loss(horizon_q / scale, y / scale, levels))
        next_loss = float(pinball_loss(next_q / scale, y[:, 0] / scale, levels))
        return {"val_pinball": horizon_loss + next_loss, "val_pinball_horizons": horizon_loss,
                "val_pinball_next": next_loss}

    result = fit(
        model, loss_fn, train_batches, evaluate, select="val_pinball", maximize=False,
        epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
        clip_grad_norm=config.clip_grad_norm, patience=config.patience,
        max_steps=1 if config.dry_run else None, desc="forecast",
    )
    print(f"best epoch {result.best_epoch}: {result.best_metrics}, {result.seconds:.0f} s", flush=True)

    # Split-conformal calibration of the interval on the validation period.
    lo, hi = config.quantiles.index(config.interval[0]), config.quantiles.index(config.interval[1])
    nominal = config.interval[1] - config.interval[0]
    calibration: dict = {"method": "none", "nominal": nominal}
    if config.conformal:
        _, x, y = sets["validation"]
        with torch.no_grad():
            horizon_q, next_q = predict(model, x)
        horizon_offsets = torch.zeros(horizons, len(levels))
        for h in range(horizons):
            offset = conformal_offset(horizon_q[:, h, lo].numpy(), horizon_q[:, h, hi].numpy(),
                                      y[:, h].numpy(), nominal)
            horizon_offsets[h, lo], horizon_offsets[h, hi] = -offset, offset
        next_offset = conformal_offset(next_q[:, lo].numpy(), next_q[:, hi].numpy(), y[:, 0].numpy(),
                                       nominal)
        model.horizon_offsets[:] = horizon_offsets
        model.next_offsets[lo], model.next_offsets[hi] = -next_offset, next_offset
        calibration = {"method": "split_conformal_cqr", "nominal": nominal,
                       "period": "validation", "examples": len(y),
                       "horizon_offsets": horizon_offsets[:, hi].tolist(), "next_offset": next_offset}
        print(f"conformal offsets (log return): horizons {horizon_offsets[:, hi].tolist()}, "
              f"next {next_offset:.5f}", flush=True)

    from training.evaluate_forecast import evaluate_test

    report = evaluate_test(model, bars, features, split, window, horizons, config.quantiles,
                           config.interval)
    metrics = {**result.best_metrics, "best_epoch": result.best_epoch,
               "train_seconds": round(result.seconds, 1), **report["summary"]}
    print(json.dumps(report["summary"], indent=1), flush=True)

    metadata = {
        "task": "forecast",
        "cell": config.cell,
        "ticker": config.ticker,
        "features": list(FEATURES),
        "window": window,
        "horizons": horizons,
        "quantiles": list(config.quantiles),
        "interval": list(config.interval),
        "normalisation": {"feature_mean": mean.tolist(), "feature_std": std.tolist(),
                          "target_scale": target_scale, "fitted_on": "train"},
        "calibration": calibration,
        "split": split.to_dict(bars),
        "last_bar": bars.rows(len(bars) - 1, len(bars))[0],
        "state_shape": [model.state_layers, config.hidden_size],
        "model_config": model_config.to_dict(),
        "train_config": to_dict(config),
        "data": {"csv": {"path": Path(config.csv_path).name, "sha256": sha256_file(config.csv_path),
                         "bars": len(bars), "first": bars.dates[0], "last": bars.dates[-1]}},
        "metrics": metrics,
        "evaluation": report["table"],
        "history": result.history,
        "dry_run": config.dry_run,
    }
    out_dir = Path(config.out_dir)
    # Reload the artifact and check that it reproduces the eager model before anything serves it.
    full, scripted, _ = export_and_reload(model, out_dir, metadata, config)
    x = sets["test"][1][:8]
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        state = scripted.initial_state(len(x))
        torch.testing.assert_close(scripted.sequence(x, state), model.sequence(x, state))
    if config.register:
        from training.registry import register

        print(f"registered {register('forecast', out_dir)}", flush=True)
    return full


if __name__ == "__main__":
    main(sys.argv[1:])
