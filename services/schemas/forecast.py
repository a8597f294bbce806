"""Forecast request and response schemas: windowed forecasts and stateful streaming sessions.

Generic rules (finite, positive prices, High >= Low, dates strictly increasing, size limits) are
checked here by pydantic, so they answer 400 before any work is queued. Rules that depend on the
loaded artifact (rows the window needs, the largest horizon, the quantile levels) are checked by
``check_forecast`` against the model's ``ForecastSpec`` and answer 400 as well.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.schemas.common import ModelInfo
from services.settings import SETTINGS

MAX_ROWS = SETTINGS.forecast.max_rows
# Price bounds keep every log return finite: log(MAX_PRICE / MIN_PRICE) is about 35.
MIN_PRICE, MAX_PRICE, MAX_VOLUME = 1e-6, 1e9, 1e15
# Bar dates: beyond these no market data exists, and past 9999-12-31 no forecast date can be named.
MIN_DATE, MAX_DATE = dt.date(1800, 1, 1), dt.date(2999, 12, 31)
MAX_HORIZON = 64  # a sanity bound for the schema; the model's own H is checked in check_forecast
# A session reads at most one bar a day, within the date range above.
MAX_BARS_SEEN = (MAX_DATE - MIN_DATE).days + 1
FLOAT32_MAX = 3.4028234663852886e38  # float(numpy.finfo(numpy.float32).max)
DISCLAIMER = ("Research/demo forecast from a small model on Yahoo Finance data; not trading or "
              "investment advice.")

# Real TSLA bars (the last 90 of the shipped data), one source for the docs, the tests and Locust.
EXAMPLE_BARS: list[dict] = json.loads(
    (Path(__file__).with_name("forecast_example.json")).read_text())["rows"]
EXAMPLE_BAR = EXAMPLE_BARS[-1]
FORECAST_EXAMPLE = {"rows": EXAMPLE_BARS[-61:], "horizon": 5, "quantiles": [0.1, 0.5, 0.9]}
SESSION_CREATE_EXAMPLE = {"history": EXAMPLE_BARS[-31:-1]}


class Bar(BaseModel):
    """One daily OHLCV bar. Prices must be finite and positive, volume finite and non-negative."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": EXAMPLE_BAR})

    date: dt.date = Field(ge=MIN_DATE, le=MAX_DATE, examples=["2025-07-01"],
                          description=f"Trading day, ISO format YYYY-MM-DD, from {MIN_DATE} to {MAX_DATE}.")
    open: float = Field(gt=0, le=MAX_PRICE, allow_inf_nan=False, description="Opening price (> 0).")
    high: float = Field(gt=0, le=MAX_PRICE, allow_inf_nan=False, description="Highest price (>= low).")
    low: float = Field(gt=0, le=MAX_PRICE, allow_inf_nan=False, description="Lowest price (> 0).")
    close: float = Field(gt=0, le=MAX_PRICE, allow_inf_nan=False, description="Closing price (> 0).")
    volume: float = Field(ge=0, le=MAX_VOLUME, allow_inf_nan=False, description="Shares traded (>= 0).")

    @model_validator(mode="after")
    def _high_not_below_low(self) -> Bar:
        for name in ("open", "high", "low", "close"):
            if getattr(self, name) < MIN_PRICE:
                raise ValueError(f"bar {self.date}: {name} {getattr(self, name)} is below the minimum "
                                 f"price {MIN_PRICE}")
        if self.high < self.low:
            raise ValueError(f"bar {self.date}: high {self.high} is below low {self.low}; "
                             "high must be >= low")
        return self


def _check_dates(rows: list[Bar], what: str) -> None:
    for i in range(1, len(rows)):
        if rows[i].date <= rows[i - 1].date:
            kind = "duplicated" if rows[i].date == rows[i - 1].date else "out of order"
            raise ValueError(f"{what}[{i}] date {rows[i].date} is {kind} after {rows[i - 1].date}; "
                             "dates must be strictly increasing, oldest first")


Rows = list[Bar]


COLUMNS = ("date", "open", "high", "low", "close", "volume")
Date = Annotated[dt.date, Field(ge=MIN_DATE, le=MAX_DATE)]
Price = Annotated[float, Field(ge=MIN_PRICE, le=MAX_PRICE, allow_inf_nan=False)]
Volume = Annotated[float, Field(ge=0, le=MAX_VOLUME, allow_inf_nan=False)]


def _column(what: str) -> object:
    return Field(default=None, min_length=2, max_length=MAX_ROWS,
                 description=f"Columnar form: the {what} of every bar, oldest first (as a pandas "
                 "DataFrame's to_dict('list') gives them); all six columns, of one length, instead of rows.")


class ForecastRequest(BaseModel):
    """A window of daily bars (oldest first) and how far ahead to forecast.

    The bars come as ``rows`` (one object per bar) or as six columns (``date``, ``open``, ``high``,
    ``low``, ``close``, ``volume``: lists of one length). Columns are checked as whole arrays, without
    an object per bar; both forms obey the same rules and give the same forecast.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": FORECAST_EXAMPLE})

    rows: Rows | None = Field(default=None, min_length=2, max_length=MAX_ROWS,
                              description=f"Daily bars, oldest first, at most {MAX_ROWS}. The model reads "
                              "the last window + 1 of them (see /v1/forecast/spec); extra older rows are "
                              "ignored and the response says so.")
    date: list[Date] | None = _column("trading days (YYYY-MM-DD)")
    open: list[Price] | None = _column("opening prices")
    high: list[Price] | None = _column("highest prices")
    low: list[Price] | None = _column("lowest prices")
    close: list[Price] | None = _column("closing prices")
    volume: list[Volume] | None = _column("volumes")
    horizon: int | None = Field(default=None, ge=1, le=MAX_HORIZON,
                                description="Forecast business days 1..horizon; at most the model's "
                                "horizons (default: all of them).")
    quantiles: list[float] | None = Field(default=None, min_length=1, max_length=16,
                                          description="Quantile levels to return, from the model's "
                                          "levels (default: all of them).")

    @model_validator(mode="after")
    def _one_form_and_consistent(self) -> ForecastRequest:
        given = [name for name in COLUMNS if getattr(self, name) is not None]
        if self.rows is not None:
            if given:
                raise ValueError(f"send the bars as rows or as the six columns, not both (got rows and "
                                 f"{', '.join(given)})")
            _check_dates(self.rows, "rows")
            return self
        if len(given) != len(COLUMNS):
            missing = [name for name in COLUMNS if name not in given]
            raise ValueError("send the bars as rows, or as all six columns " + ", ".join(COLUMNS) +
                             (f"; missing: {', '.join(missing)}" if given else ""))
        lengths = {name: len(getattr(self, name)) for name in COLUMNS}
        if len(set(lengths.values())) != 1:
            raise ValueError("the columns must have one length; got " +
                             ", ".join(f"{name} {length}" for name, length in lengths.items()))
        high, low = np.asarray(self.high), np.asarray(self.low)
        if (below := np.flatnonzero(high < low)).size:
            i = int(below[0])
            raise ValueError(f"high[{i}] {self.high[i]} is below low[{i}] {self.low[i]}; high must be >= low")
        days = np.asarray(self.date, dtype="datetime64[D]")
        if (bad := np.flatnonzero(days[1:] <= days[:-1])).size:
            i = int(bad[0]) + 1
            kind = "duplicated" if days[i] == days[i - 1] else "out of order"
            raise ValueError(f"date[{i}] {self.date[i]} is {kind} after {self.date[i - 1]}; dates must be "
                             "strictly increasing, oldest first")
        return self

    @property
    def bars_field(self) -> str:
        """The field that holds the bars: ``rows`` or ``date`` (the columnar form)."""
        return "rows" if self.rows is not None else "date"

    def bar_count(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.date or [])

    def last_columns(self, count: int) -> tuple[list[float], ...]:
        """open, high, low, close, volume of the last ``count`` bars, oldest first (the columnar form
        slices its lists; the row form reads its bars)."""
        if self.rows is None:
            return tuple(getattr(self, name)[-count:] for name in COLUMNS[1:])
        bars = self.rows[-count:]
        return ([b.open for b in bars], [b.high for b in bars], [b.low for b in bars],
                [b.close for b in bars], [b.volume for b in bars])

    def last_bars(self, count: int) -> list[Bar]:
        """The last ``count`` bars (already validated: the columnar form builds only these)."""
        if self.rows is not None:
            return self.rows[-count:]
        start = max(0, len(self.date) - count)
        return [Bar.model_construct(date=self.date[i], open=self.open[i], high=self.high[i], low=self.low[i],
                                    close=self.close[i], volume=self.volume[i])
                for i in range(start, len(self.date))]


class ForecastSpec(BaseModel):
    """What the loaded artifact reads and returns, and the session limits of this server."""

    window: int = Field(description="Daily returns the many-to-one model reads (rows needed - 1).")
    rows_needed: int = Field(description="Rows a forecast request must send at least.")
    horizons: int = Field(description="Largest horizon, in business days.")
    quantiles: list[float] = Field(description="Quantile levels the model outputs.")
    interval: list[float] = Field(description="Quantile levels of the calibrated interval.")
    nominal_coverage: float = Field(description="Nominal coverage of the interval.")
    max_sessions: int
    session_ttl_s: int


class ForecastMismatchError(ValueError):
    """A request that does not fit the loaded model, and the field that does not (for the 400)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def check_forecast(request: ForecastRequest, spec: ForecastSpec) -> None:
    """Raises ``ForecastMismatchError`` naming the limit and the field when ``request`` does not fit
    the loaded model."""
    bars = request.bar_count()
    if bars < spec.rows_needed:
        raise ForecastMismatchError(f"{request.bars_field} has {bars} bars; this model needs at least "
                                    f"{spec.rows_needed} (a window of {spec.window} daily returns)",
                                    request.bars_field)
    if request.horizon is not None and request.horizon > spec.horizons:
        raise ForecastMismatchError(f"horizon {request.horizon} is out of range; this model forecasts 1 "
                                    f"to {spec.horizons} business days", "horizon")
    for index, level in enumerate(request.quantiles or []):
        if level not in spec.quantiles:
            raise ForecastMismatchError(f"quantile {level} is not available; choose from "
                                        f"{spec.quantiles}", f"quantiles[{index}]")


class DayForecast(BaseModel):
    """The forecast for one business day ahead of the last bar."""

    horizon: int = Field(description="Business days after the last bar.", examples=[1])
    date: dt.date = Field(description="The business day forecast (Mon-Fri; exchange holidays are not "
                          "skipped).")
    point: float = Field(description="Median (p50) forecast of the close.")
    lower: float = Field(description="Lower end of the calibrated interval.")
    upper: float = Field(description="Upper end of the calibrated interval.")
    quantiles: dict[str, float] = Field(description="Close forecast at each requested quantile level.",
                                        examples=[{"0.1": 290.1, "0.5": 318.0, "0.9": 345.2}])
    log_return: float = Field(description="Median forecast of log(close[t+h] / close[t]).")


class WindowResult(BaseModel):
    """The model service's answer to one window (internal)."""

    forecasts: list[DayForecast] = Field(default_factory=list)
    rows_used: int = 0
    error: str | None = None


class ForecastResponse(BaseModel):
    model: ModelInfo
    last_date: dt.date = Field(description="Date of the last bar sent.")
    last_close: float
    forecasts: list[DayForecast] = Field(description="One forecast per horizon, 1..horizon.")
    interval: list[float] = Field(description="Quantile levels of lower/upper.", examples=[[0.1, 0.9]])
    nominal_coverage: float = Field(examples=[0.8])
    rows_received: int
    rows_used: int = Field(description="Rows the model read (window + 1, the oldest only for its "
                           "close).")
    note: str | None = Field(default=None, description="Set when rows were ignored.")
    disclaimer: str = DISCLAIMER


# Sessions ---------------------------------------------------------------------------------------


class SessionCreateRequest(BaseModel):
    """Opens a session, optionally warmed with history (oldest first)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": SESSION_CREATE_EXAMPLE})

    history: Rows | None = Field(default=None, min_length=1, max_length=MAX_ROWS,
                                 description=f"Up to {MAX_ROWS} bars to run through the model before "
                                 "the first step.")

    @model_validator(mode="after")
    def _dates_increasing(self) -> SessionCreateRequest:
        _check_dates(self.history or [], "history")
        return self


SESSION_ID = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                   description="Session id returned when the session was created.",
                   examples=["pL3_v2kqJ8x0aQ5wRk9e7A"])


class SessionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str = SESSION_ID


class StepRequest(BaseModel):
    """One new bar for a session; its date must be after the session's last bar."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "session_id": "pL3_v2kqJ8x0aQ5wRk9e7A", "bar": EXAMPLE_BAR}})

    session_id: str = SESSION_ID
    bar: Bar


class SessionState(BaseModel):
    """A session's full state, to resume it on another replica (``/v1/forecast/sessions/import``).

    It passes through clients' hands, so import checks all of it: here what needs no model (values
    finite in float32, ``bars_seen`` within the bar date range, ``next`` after ``last_bar``), and in
    services/session_checks.py the rest against the loaded model (version, shape, the range its
    recurrence keeps a state in, ``next`` as a step after ``last_bar`` answers it).
    """

    model_config = ConfigDict(extra="forbid")

    model_version: str = Field(max_length=64, description="The artifact version the state belongs "
                               "to; import refuses another.")
    state_shape: list[int] = Field(min_length=2, max_length=2,
                                   description="(state layers, hidden size); LSTM stacks h over c.")
    state: list[float] = Field(max_length=65536, description="Hidden state, row-major; each value "
                               "finite in float32 and within the range the model keeps it in.")
    last_bar: Bar | None = Field(default=None, description="The last bar seen (features need its "
                                 "close and volume).")
    bars_seen: int = Field(ge=0, le=MAX_BARS_SEEN, description="Bars the session has read: at most "
                           "one per day from the first bar date the schema accepts to last_bar's.")
    next: DayForecast | None = None

    @model_validator(mode="after")
    def _plausible(self) -> SessionState:
        for i, value in enumerate(self.state):
            if not abs(value) <= FLOAT32_MAX:  # also NaN; 1e39 is finite in float64, not in float32
                raise ValueError(f"state[{i}] is {value!r}, not a finite float32 (|value| <= "
                                 f"{FLOAT32_MAX:g})")
        if self.last_bar is not None:
            days = (self.last_bar.date - MIN_DATE).days + 1
            if self.bars_seen > days:
                raise ValueError(f"bars_seen {self.bars_seen} is more than the {days} days from "
                                 f"{MIN_DATE} to last_bar's date {self.last_bar.date}")
        if self.next is not None and (self.last_bar is None or self.next.date <= self.last_bar.date):
            raise ValueError("next must forecast a day after last_bar's date")
        return self


class SessionInfo(BaseModel):
    session_id: str
    model_version: str
    bars_seen: int = Field(description="Bars streamed into the session, history included.")
    last_date: dt.date | None = None
    last_close: float | None = None
    ttl_s: int = Field(description="Idle seconds after which the session expires.")
    next: DayForecast | None = Field(default=None, description="Forecast for the next business day "
                                  "(many-to-many model); none until two bars have been seen.")
    disclaimer: str = DISCLAIMER


class SessionResult(BaseModel):
    """The model service's answer about one session (internal): a session, or an error."""

    session: SessionInfo | None = None
    state: SessionState | None = None
    error: str | None = Field(default=None, description="not_found, too_many_sessions, invalid, stale, "
                              "model_version, unavailable or busy (services/forecast.py SESSION_ERRORS).")
    message: str | None = None


class StepItem(BaseModel):
    """One step of the batchable model-service API (internal)."""

    session_id: str
    bar: Bar


class Deleted(BaseModel):
    session_id: str
    deleted: bool = True
