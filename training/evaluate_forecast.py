"""Evaluates the forecaster against naive baselines on the test period, and draws the test chart.

    python -m training.evaluate_forecast                       # the committed artifact on TSLA
    python -m training.evaluate_forecast --artifact-dir DIR --csv-path my_ticker.csv

Methods, for every horizon h (price units; origin close C_t, actual close C_{t+h}):

* ``rnn`` (many-to-one head): C_t·exp(p50), interval C_t·exp(p10 .. p90) after conformal calibration;
* ``rnn_next`` (many-to-many head, h = 1 only): the same from the window's last step;
* ``persistence``: C_t ("tomorrow = today"), with a naive interval from the training period's
  empirical h-day return quantiles;
* ``drift``: C_t·exp(h·mu_t), mu_t the mean daily log return of all history up to t (Hyndman's drift);
* ``always_up``: direction only, "the price goes up" every day.

Writes ``training/reports/forecast_eval.{json,md}`` and ``training/reports/forecast_test.png``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.artifact import METADATA_FILE, load_artifact
from training.config import parse_config
from training.forecast_data import (
    Bars,
    Split,
    chronological_split,
    feature_matrix,
    horizon_targets,
    origins,
    read_yahoo_csv,
    windows,
)

REPORTS = Path(__file__).parent / "reports"


@dataclass(frozen=True)
class EvaluateForecastConfig:
    artifact_dir: str = "models/artifacts/forecast"
    csv_path: str = str(Path(__file__).parent / "data" / "stock" / "TSLA.csv")
    out_dir: str = str(REPORTS)
    dry_run: bool = False


def _scores(actual: np.ndarray, origin_close: np.ndarray, point: np.ndarray | None,
            direction: np.ndarray | None, band: tuple[np.ndarray, np.ndarray] | None) -> dict:
    actual_up = actual > origin_close
    row: dict = {"n": len(actual)}
    if point is not None:
        error = point - actual
        row["rmse"] = float(np.sqrt(np.mean(error ** 2)))
        row["mae"] = float(np.mean(np.abs(error)))
    if direction is not None:
        row["directional_accuracy"] = float(np.mean(direction == actual_up))
    if band is not None:
        lower, upper = band
        row["coverage"] = float(np.mean((actual >= lower) & (actual <= upper)))
        row["mean_width"] = float(np.mean(upper - lower))
        row["mean_width_pct"] = float(np.mean((upper - lower) / origin_close) * 100)
    return row


@torch.no_grad()
def predict_windows(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, Q) horizon quantiles and (n, Q) next-bar quantiles (log returns)."""
    next_q, _ = model.sequence(x, model.initial_state(len(x)))
    return model(x).numpy(), next_q[:, -1].numpy()


def evaluate_test(model, bars: Bars, features: np.ndarray, split: Split, window: int, horizons: int,
                  quantiles: tuple[float, ...] | list[float], interval: tuple[float, ...] | list[float]
                  ) -> dict:
    """Scores every method on the test period. Returns ``summary``, ``table`` and chart ``series``."""
    quantiles = list(quantiles)
    lo, mid, hi = quantiles.index(interval[0]), quantiles.index(0.5), quantiles.index(interval[1])
    origin = origins(split, len(bars), window, horizons, "test")
    targets = horizon_targets(bars.close, origin, horizons)  # (n, H)
    horizon_q, next_q = predict_windows(model, torch.from_numpy(windows(features, origin, window)))
    close = bars.close
    log_close = np.log(close)
    # Naive interval for persistence: empirical h-day return quantiles of the training period.
    train_close = log_close[:split.val_start]
    table: list[dict] = []
    summary: dict = {}
    up_rates = []
    for h in range(1, horizons + 1):
        valid = ~np.isnan(targets[:, h - 1])
        t = origin[valid]
        c0, actual = close[t], close[t + h]
        rnn_q = horizon_q[valid, h - 1]  # (n, Q)
        mu = (log_close[t] - log_close[0]) / t  # expanding mean daily log return up to t
        train_h = train_close[h:] - train_close[:-h]
        naive_lo, naive_hi = np.quantile(train_h, interval[0]), np.quantile(train_h, interval[1])
        rows = {
            "rnn": _scores(actual, c0, c0 * np.exp(rnn_q[:, mid]), rnn_q[:, mid] > 0,
                           (c0 * np.exp(rnn_q[:, lo]), c0 * np.exp(rnn_q[:, hi]))),
            "persistence": _scores(actual, c0, c0, None,
                                   (c0 * np.exp(naive_lo), c0 * np.exp(naive_hi))),
            "drift": _scores(actual, c0, c0 * np.exp(h * mu), mu > 0, None),
            "always_up": _scores(actual, c0, None, np.ones(len(t), dtype=bool), None),
        }
        if h == 1:
            nq = next_q[valid]
            rows["rnn_next"] = _scores(actual, c0, c0 * np.exp(nq[:, mid]), nq[:, mid] > 0,
                                       (c0 * np.exp(nq[:, lo]), c0 * np.exp(nq[:, hi])))
        persistence_rmse = rows["persistence"]["rmse"]
        for method, row in rows.items():
            if "rmse" in row:
                row["rmse_ratio_to_persistence"] = row["rmse"] / persistence_rmse
            table.append({"method": method, "horizon": h, **row})
        up_rates.append(rows["always_up"]["directional_accuracy"])
        if h in (1, horizons):
            for key in ("rmse", "mae", "rmse_ratio_to_persistence", "directional_accuracy", "coverage",
                        "mean_width_pct"):
                summary[f"test_h{h}_{key}"] = round(rows["rnn"][key], 4)
            summary[f"test_h{h}_persistence_rmse"] = round(persistence_rmse, 4)
            summary[f"test_h{h}_always_up_rate"] = round(rows["always_up"]["directional_accuracy"], 4)
    summary["test_coverage_mean"] = round(float(np.mean(
        [r["coverage"] for r in table if r["method"] == "rnn"])), 4)
    summary["test_period"] = [bars.dates[split.test_start], bars.dates[-1]]
    # Chart series: 1-day-ahead forecasts for every test day (dated at the target day).
    series = {
        "dates": [bars.dates[i + 1] for i in origin],
        "actual": close[origin + 1].tolist(),
        "p50": (close[origin] * np.exp(horizon_q[:, 0, mid])).tolist(),
        "lower": (close[origin] * np.exp(horizon_q[:, 0, lo])).tolist(),
        "upper": (close[origin] * np.exp(horizon_q[:, 0, hi])).tolist(),
    }
    return {"summary": summary, "table": table, "series": series}


def markdown_table(table: list[dict], horizons: tuple[int, ...]) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "—"

    lines = ["| h | method | RMSE ($) | MAE ($) | RMSE / persistence | directional acc. | "
             "80% coverage | mean width (% of price) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table:
        if row["horizon"] not in horizons:
            continue
        lines.append(f"| {row['horizon']} | {row['method']} | {cell(row, 'rmse', '.2f')} | "
                     f"{cell(row, 'mae', '.2f')} | {cell(row, 'rmse_ratio_to_persistence', '.3f')} | "
                     f"{cell(row, 'directional_accuracy', '.3f')} | {cell(row, 'coverage', '.3f')} | "
                     f"{cell(row, 'mean_width_pct', '.1f')} |")
    return "\n".join(lines)


def draw_chart(series: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    from matplotlib import pyplot as plt

    dates = np.array(series["dates"], dtype="datetime64[D]")
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    ax.fill_between(dates, series["lower"], series["upper"], color="tab:blue", alpha=0.2, lw=0,
                    label="80% interval (p10–p90, conformal)")
    ax.plot(dates, series["p50"], color="tab:blue", lw=1.0, label="1-day forecast (p50)")
    ax.plot(dates, series["actual"], color="black", lw=1.2, label="actual close")
    ax.set_title(title)
    ax.set_ylabel("USD")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m"))
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(EvaluateForecastConfig, argv, description=__doc__)
    torch.set_num_threads(1)

    model, metadata = load_artifact(config.artifact_dir)
    sha256 = json.loads((Path(config.artifact_dir) / METADATA_FILE).read_text())["sha256"]
    bars = read_yahoo_csv(config.csv_path)
    train_config = metadata["train_config"]
    split = chronological_split(bars, train_config["val_months"], train_config["test_months"])
    report = evaluate_test(model, bars, feature_matrix(bars), split, metadata["window"],
                           metadata["horizons"], metadata["quantiles"], metadata["interval"])
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "forecast_eval.json").write_text(json.dumps(
        {"summary": report["summary"], "table": report["table"], "model": sha256[:16],
         "cell": metadata["cell"]}, indent=1) + "\n")
    shown = tuple(sorted({1, metadata["horizons"]}))
    table = markdown_table(report["table"], shown)
    (out_dir / "forecast_eval.md").write_text(table + "\n")
    ticker = metadata.get("ticker", "")
    draw_chart(report["series"], out_dir / "forecast_test.png",
               f"{ticker} test period {report['summary']['test_period'][0]} to "
               f"{report['summary']['test_period'][1]}: 1-day-ahead forecast "
               f"(coverage {report['summary']['test_h1_coverage']:.0%})")
    print(table)
    print(json.dumps(report["summary"], indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
