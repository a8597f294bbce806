"""The forecast artifact's windowed path and the pure helpers every forecast module shares.

Windowed forecasts (many-to-one head): every request's last ``window + 1`` rows become a (L, F)
feature window; concurrent requests are stacked into one (B, L, F) batch (all windows have the same
length, so there is no padding) and run in one forward pass. The entry service runs a ``WindowModel``
in each of its workers (services/inprocess.py), so public windowed forecasts never cross a second
HTTP hop.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.forecast import bar_features
from services.artifacts import load_stored_model
from services.metrics import INFERENCE_SECONDS
from services.schemas.common import ModelInfo
from services.schemas.forecast import Bar, DayForecast, ForecastRequest, ForecastSpec, WindowResult
from services.settings import SETTINGS

logger = logging.getLogger(__name__)
NAME = "forecast"


@dataclass(frozen=True)
class ModelSpec:
    """What serving needs from the artifact's metadata."""

    version: str
    window: int
    horizons: int
    quantiles: tuple[float, ...]
    interval: tuple[float, float]
    state_shape: tuple[int, int]

    @classmethod
    def from_metadata(cls, metadata: dict, version: str) -> ModelSpec:
        return cls(version=version, window=int(metadata["window"]), horizons=int(metadata["horizons"]),
                   quantiles=tuple(metadata["quantiles"]), interval=tuple(metadata["interval"]),
                   state_shape=tuple(metadata["state_shape"]))

    def public(self, max_sessions: int, ttl_s: int) -> ForecastSpec:
        return ForecastSpec(window=self.window, rows_needed=self.window + 1, horizons=self.horizons,
                            quantiles=list(self.quantiles), interval=list(self.interval),
                            nominal_coverage=round(self.interval[1] - self.interval[0], 6),
                            max_sessions=max_sessions, session_ttl_s=ttl_s)


def business_dates(last: dt.date, count: int) -> list[dt.date]:
    """The ``count`` weekdays after ``last`` (exchange holidays are not known and not skipped).

    Raises ``ValueError`` when one of them is past 9999-12-31 (numpy then gives an int, not a date).
    """
    return list(_business_dates(last, count))


@functools.lru_cache(maxsize=4096)  # requests share their last dates; numpy's calendar is per call
def _business_dates(last: dt.date, count: int) -> tuple[dt.date, ...]:
    days = np.busday_offset(np.datetime64(last, "D"), np.arange(1, count + 1), roll="backward")
    dates = tuple(d.astype(dt.date) for d in days)
    if not all(isinstance(d, dt.date) for d in dates):
        raise ValueError(f"the forecast dates after {last} are past {dt.date.max}")
    return dates


def window_features(windows: Sequence[tuple[Sequence[float], ...]]) -> np.ndarray:
    """``bar_features`` of many windows at once: each window is (open, high, low, close, volume) of
    L + 1 bars, oldest first; the result is (B, L, F) float32, row for row what ``row_features`` gives
    (float64 arithmetic, then float32), without a Python call per bar."""
    bars = np.asarray(windows, dtype=np.float64)  # (B, 5, L + 1)
    open_, high, low, close, volume = (bars[:, k] for k in range(5))
    previous_close, previous_volume = close[:, :-1], volume[:, :-1]
    open_, high, low, close, volume = open_[:, 1:], high[:, 1:], low[:, 1:], close[:, 1:], volume[:, 1:]
    features = np.stack([np.log(close / previous_close), np.log(high / low), np.log(close / open_),
                         np.log(open_ / previous_close), np.log1p(volume) - np.log1p(previous_volume)],
                        axis=-1)
    return features.astype(np.float32)


def row_features(rows: Sequence[Bar]) -> list[list[float]]:
    """Features of rows[1:], each against its predecessor. Shape: (len(rows) - 1, F)."""
    return [bar_features(prev.close, prev.volume, bar.open, bar.high, bar.low, bar.close, bar.volume)
            for prev, bar in itertools.pairwise(rows)]


def to_forecasts(spec: ModelSpec, last: Bar, quantiles: np.ndarray,
                 levels: Sequence[float] | None = None) -> list[DayForecast]:
    """Price forecasts from cumulative log-return quantiles. ``quantiles``: (horizons, Q)."""
    if not np.isfinite(quantiles).all():
        raise ValueError("the model produced a non-finite forecast")
    levels = list(levels or spec.quantiles)
    lo, mid, hi = (spec.quantiles.index(q) for q in (spec.interval[0], 0.5, spec.interval[1]))
    prices = last.close * np.exp(quantiles)  # (horizons, Q)
    dates = business_dates(last.date, len(quantiles))
    return [
        DayForecast(horizon=h + 1, date=dates[h], point=float(prices[h, mid]), lower=float(prices[h, lo]),
                    upper=float(prices[h, hi]), log_return=float(quantiles[h, mid]),
                    quantiles={str(q): float(prices[h, spec.quantiles.index(q)]) for q in levels})
        for h in range(len(quantiles))
    ]


@torch.inference_mode()
def forecast_windows(model: torch.nn.Module, spec: ModelSpec, requests: Sequence[ForecastRequest],
                     device: str = "cpu") -> list[WindowResult]:
    """The whole batched windowed path: requests in, one result per request out, in order."""
    results: list[WindowResult | None] = [None] * len(requests)
    rows_needed = spec.window + 1
    batch, windows = [], []
    for i, request in enumerate(requests):
        horizon = request.horizon or spec.horizons
        if request.bar_count() < rows_needed or horizon > spec.horizons:
            results[i] = WindowResult(error=f"needs >= {rows_needed} rows and horizon <= {spec.horizons}")
            continue
        batch.append(i)
        windows.append(request.last_columns(rows_needed))
    if batch:
        x = torch.from_numpy(window_features(windows)).to(device)  # (B, L, F)
        started = time.perf_counter()
        quantiles = model(x).cpu().numpy()  # (B, H, Q)
        INFERENCE_SECONDS.labels(NAME).observe(time.perf_counter() - started)
        for row, i in enumerate(batch):
            request = requests[i]
            horizon = request.horizon or spec.horizons
            try:
                results[i] = WindowResult(rows_used=rows_needed, forecasts=to_forecasts(
                    spec, request.last_bars(1)[0], quantiles[row, :horizon], request.quantiles))
            except ValueError as exc:  # non-finite output: a 400 for this item, not a 500 for all
                results[i] = WindowResult(error=f"{exc}; check the rows for extreme values")
    return results  # type: ignore[return-value]


def warm_up_rows(spec: ModelSpec) -> list[Bar]:
    """A plausible window of daily bars, for warming up."""
    day = dt.date(2024, 1, 1)
    return [Bar(date=day + dt.timedelta(days=i), open=100.0, high=101.0 + i % 3, low=99.0,
                close=100.0 + i % 5, volume=1e6 + i) for i in range(spec.window + 2)]


class WindowModel:
    """The verified forecast artifact and its batched path for stateless windows.

    The entry service runs one in each worker (services/inprocess.py); ``Forecast`` below holds one
    for its sessions.
    """

    def __init__(self, model: torch.jit.ScriptModule, metadata: dict, model_info: ModelInfo,
                 device: str) -> None:
        self.model, self.metadata, self.model_info, self.device = model, metadata, model_info, device
        self.model_spec = ModelSpec.from_metadata(metadata, model_info.version)
        # What /v1/forecast/spec answers: fixed by the artifact and the settings.
        self.public_spec = self.model_spec.public(SETTINGS.forecast.max_sessions,
                                                  SETTINGS.forecast.session_ttl_s)

    @classmethod
    def load(cls, stored, device: str) -> WindowModel:
        """Loads a model-store entry (checksum-verified) and warms up windows at batch 1 and full."""
        windows = cls(*load_stored_model(stored, device), device)
        started = time.perf_counter()
        request = ForecastRequest(rows=warm_up_rows(windows.model_spec))
        for batch_size in (1, SETTINGS.forecast.max_batch_size):
            windows.forecast([request] * batch_size)
        logger.info("forecast windows %s warmed up on %s in %.2f s", windows.model_spec.version, device,
                    time.perf_counter() - started)
        return windows

    def forecast(self, requests: list[ForecastRequest]) -> list[WindowResult]:
        return forecast_windows(self.model, self.model_spec, requests, self.device)


