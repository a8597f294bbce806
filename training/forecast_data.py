"""Daily OHLCV data for the forecaster: Yahoo-format CSV reading, features, chronological splits.

Shared by ``train_forecast``, ``evaluate_forecast`` and ``bench_forecast_sessions``. Every split is by
date: train, then validation, then a test period of the last ``test_months`` months. A sample
belongs to a period only if ALL of its targets fall in that period, and normalisation statistics are
computed on training bars only, so nothing from later periods leaks into training.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.forecast import FEATURES, bar_features

YAHOO_COLUMNS = ("Date", "Open", "High", "Low", "Close", "Volume")


@dataclass(frozen=True)
class Bars:
    """Daily bars, oldest first. Prices are float64 arrays; dates are ISO strings."""

    dates: list[str]
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    def __len__(self) -> int:
        return len(self.dates)

    def rows(self, start: int, stop: int) -> list[dict]:
        """Bars ``start:stop`` as request rows (the service's JSON shape)."""
        return [{"date": self.dates[i], "open": float(self.open[i]), "high": float(self.high[i]),
                 "low": float(self.low[i]), "close": float(self.close[i]),
                 "volume": float(self.volume[i])} for i in range(start, stop)]


def read_yahoo_csv(path: str | Path) -> Bars:
    """Reads a Yahoo Finance daily CSV (``Date,Open,High,Low,Close,Adj Close,Volume``).

    ``Close`` is used, not ``Adj Close``: the features combine close with open/high/low, which Yahoo
    does not dividend-adjust. Rows with ``null`` fields (Yahoo's missing bars) are rejected.
    """
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in YAHOO_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected a Yahoo daily CSV with "
                             f"{', '.join(YAHOO_COLUMNS)}")
        rows = list(reader)
    dates = [row["Date"] for row in rows]
    try:
        values = {c: np.array([float(row[c]) for row in rows]) for c in YAHOO_COLUMNS[1:]}
    except ValueError as exc:
        raise ValueError(f"{path}: a price or volume is not a number ({exc})") from exc
    bars = Bars(dates, values["Open"], values["High"], values["Low"], values["Close"], values["Volume"])
    check_bars(bars, str(path))
    return bars


def check_bars(bars: Bars, name: str) -> None:
    for i in range(1, len(bars)):
        if bars.dates[i] <= bars.dates[i - 1]:
            raise ValueError(f"{name}: dates not strictly increasing at row {i}: "
                             f"{bars.dates[i - 1]} then {bars.dates[i]}")
    prices = np.stack([bars.open, bars.high, bars.low, bars.close])
    if not np.isfinite(prices).all() or (prices <= 0).any():
        raise ValueError(f"{name}: every price must be finite and positive")
    if (bars.high < bars.low).any() or not np.isfinite(bars.volume).all() or (bars.volume < 0).any():
        raise ValueError(f"{name}: needs High >= Low and a finite, non-negative Volume on every row")


def feature_matrix(bars: Bars) -> np.ndarray:
    """Features of every bar; row 0 has no previous bar and is NaN. Shape: (N, F) float32."""
    features = np.full((len(bars), len(FEATURES)), np.nan)
    for i in range(1, len(bars)):
        features[i] = bar_features(bars.close[i - 1], bars.volume[i - 1], bars.open[i], bars.high[i],
                                   bars.low[i], bars.close[i], bars.volume[i])
    return features.astype(np.float32)


def months_before(date: str, months: int) -> str:
    """The ISO date ``months`` calendar months before the day after ``date`` (day clamped to 28)."""
    day = dt.date.fromisoformat(date) + dt.timedelta(days=1)
    total = day.year * 12 + day.month - 1 - months
    return dt.date(total // 12, total % 12 + 1, min(day.day, 28)).isoformat()


@dataclass(frozen=True)
class Split:
    """Chronological boundaries as bar indices: train bars are ``[0, val_start)``, validation
    ``[val_start, test_start)``, test ``[test_start, N)``."""

    val_start: int
    test_start: int
    dates: tuple[str, str, str]  # first date of train, validation, test

    def to_dict(self, bars: Bars) -> dict:
        return {
            "train": [bars.dates[0], bars.dates[self.val_start - 1]],
            "validation": [bars.dates[self.val_start], bars.dates[self.test_start - 1]],
            "test": [bars.dates[self.test_start], bars.dates[-1]],
            "bars": {"train": self.val_start, "validation": self.test_start - self.val_start,
                     "test": len(bars) - self.test_start},
        }


def chronological_split(bars: Bars, val_months: int, test_months: int) -> Split:
    test_date = months_before(bars.dates[-1], test_months)
    val_date = months_before(bars.dates[-1], test_months + val_months)
    test_start = next(i for i, d in enumerate(bars.dates) if d >= test_date)
    val_start = next(i for i, d in enumerate(bars.dates) if d >= val_date)
    if val_start < 200:
        raise ValueError(f"only {val_start} training bars before {val_date}; need a longer history")
    return Split(val_start, test_start, (bars.dates[0], bars.dates[val_start], bars.dates[test_start]))


def origins(split: Split, n_bars: int, window: int, horizons: int, period: str) -> np.ndarray:
    """Forecast origins t (the last bar of a window) whose targets all lie in ``period``.

    A window is features ``t-window+1 .. t`` (feature 0 is NaN, so t >= window); its targets are the
    closes ``t+1 .. t+horizons``. For "test", origins need only their first target in the period;
    later horizons past the end of the data are masked by the evaluation.
    """
    t = np.arange(window, n_bars - 1)
    if period == "train":
        keep = t + horizons < split.val_start
    elif period == "validation":
        keep = (t + 1 >= split.val_start) & (t + horizons < split.test_start)
    elif period == "test":
        keep = t + 1 >= split.test_start
    else:
        raise ValueError(f"unknown period {period!r}")
    return t[keep]


def windows(features: np.ndarray, origin: np.ndarray, window: int) -> np.ndarray:
    """Feature windows ending at each origin. Shape: (n, window, F)."""
    index = origin[:, None] + np.arange(-window + 1, 1)[None, :]  # (n, window)
    return features[index]


def horizon_targets(close: np.ndarray, origin: np.ndarray, horizons: int) -> np.ndarray:
    """Cumulative log returns log(close[t+h] / close[t]), NaN past the data. Shape: (n, horizons)."""
    log_close = np.log(close)
    out = np.full((len(origin), horizons), np.nan)
    for h in range(1, horizons + 1):
        valid = origin + h < len(close)
        out[valid, h - 1] = log_close[origin[valid] + h] - log_close[origin[valid]]
    return out
