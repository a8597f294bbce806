"""Forecast model service: batched windowed forecasts and stateful streaming sessions.

Windowed forecasts (many-to-one head): every request's last ``window + 1`` rows become a (L, F)
feature window; concurrent requests are stacked into one (B, L, F) batch (all windows have the same
length, so there is no padding) and run in one forward pass. ``WindowModel`` holds that path; the
entry service runs one in each of its workers (services/inprocess.py), so public windowed forecasts
never cross a second HTTP hop.

Sessions (many-to-many head): the server keeps each session's hidden state, so a client streaming one
new bar pays one RNN step instead of resending and recomputing a window. Steps of many sessions that
arrive together are merged by BentoML's batcher and computed as ONE batched ``model.step`` call on
the stacked states (S*layers, B, H).

Sessions live in this process's memory, which is why the service runs exactly one worker: a second
worker (or replica) would not see them. A restart loses every session; clients then get 404 and
either create a new session with history or re-import a state they exported
(``export_session``/``import_session``). See the README for routing several replicas.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import bentoml
import numpy as np
import torch
from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse

from models.forecast import bar_features
from services.artifacts import load_stored_model
from services.metrics import (
    FORECAST_SESSION_EXPIRATIONS_TOTAL,
    FORECAST_SESSION_STEPS_TOTAL,
    FORECAST_SESSIONS_ACTIVE,
    INFERENCE_SECONDS,
)
from services.schemas.common import ModelInfo
from services.schemas.forecast import (
    Bar,
    DayForecast,
    ForecastRequest,
    ForecastResponse,
    ForecastSpec,
    SessionInfo,
    SessionResult,
    SessionState,
    StepItem,
    WindowResult,
)
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
    days = np.busday_offset(np.datetime64(last, "D"), np.arange(1, count + 1), roll="backward")
    dates = [d.astype(dt.date) for d in days]
    if not all(isinstance(d, dt.date) for d in dates):
        raise ValueError(f"the forecast dates after {last} are past {dt.date.max}")
    return dates


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
        if len(request.rows) < rows_needed or horizon > spec.horizons:
            results[i] = WindowResult(error=f"needs >= {rows_needed} rows and horizon <= {spec.horizons}")
            continue
        batch.append(i)
        windows.append(row_features(request.rows[-rows_needed:]))
    if batch:
        x = torch.tensor(windows, dtype=torch.float32, device=device)  # (B, L, F)
        started = time.perf_counter()
        quantiles = model(x).cpu().numpy()  # (B, H, Q)
        INFERENCE_SECONDS.labels(NAME).observe(time.perf_counter() - started)
        for row, i in enumerate(batch):
            request = requests[i]
            horizon = request.horizon or spec.horizons
            try:
                results[i] = WindowResult(rows_used=rows_needed, forecasts=to_forecasts(
                    spec, request.rows[-1], quantiles[row, :horizon], request.quantiles))
            except ValueError as exc:  # non-finite output: a 400 for this item, not a 500 for all
                results[i] = WindowResult(error=f"{exc}; check the rows for extreme values")
    return results  # type: ignore[return-value]


@dataclass
class Session:
    session_id: str
    state: torch.Tensor  # (S*layers, 1, H)
    last_bar: Bar | None
    bars_seen: int
    next: DayForecast | None
    last_used: float


class SessionStore:
    """Every open session of one model, with TTL expiry and a size limit. Thread-safe.

    Errors are returned as ``SessionResult(error=...)`` items rather than raised, so one bad item
    of a batched step never fails its neighbours; the entry service maps them to 404 / 429 / 400.
    A call that returns an error never changes any session.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, max_sessions: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic, device: str = "cpu",
                 model_name: str = NAME) -> None:
        self.model, self.spec, self.device = model, spec, device
        self.max_sessions, self.ttl_s, self.clock = max_sessions, ttl_s, clock
        self.model_name = model_name
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.expired: OrderedDict[str, None] = OrderedDict()  # recent expiries, for clearer 404s
        self.lock = threading.RLock()
        FORECAST_SESSIONS_ACTIVE.labels(model_name).set(0)

    # Bookkeeping -------------------------------------------------------------------------------

    def purge_expired(self) -> int:
        """Drops sessions idle for longer than the TTL; returns how many."""
        with self.lock:
            now, count = self.clock(), 0
            while self.sessions:
                oldest = next(iter(self.sessions.values()))
                if now - oldest.last_used <= self.ttl_s:
                    break
                del self.sessions[oldest.session_id]
                self.expired[oldest.session_id] = None
                count += 1
            while len(self.expired) > self.max_sessions:
                self.expired.popitem(last=False)
            if count:
                FORECAST_SESSION_EXPIRATIONS_TOTAL.labels(self.model_name).inc(count)
            FORECAST_SESSIONS_ACTIVE.labels(self.model_name).set(len(self.sessions))
            return count

    def _touch(self, session: Session) -> None:
        session.last_used = self.clock()
        self.sessions.move_to_end(session.session_id)

    def _not_found(self, session_id: str) -> SessionResult:
        if session_id in self.expired:
            message = f"session {session_id} expired after more than {self.ttl_s:g} s idle"
        else:
            message = (f"session {session_id} is unknown or expired (sessions expire after "
                       f"{self.ttl_s:g} s idle)")
        return SessionResult(error="not_found", message=message + "; create a new one")

    def _lookup(self, session_id: str) -> Session | SessionResult:
        session = self.sessions.get(session_id)
        return session if session is not None else self._not_found(session_id)

    def _info(self, session: Session) -> SessionInfo:
        last = session.last_bar
        return SessionInfo(session_id=session.session_id, model_version=self.spec.version,
                           bars_seen=session.bars_seen, last_date=last.date if last else None,
                           last_close=last.close if last else None, ttl_s=int(self.ttl_s),
                           next=session.next)

    def _room(self) -> SessionResult | None:
        if len(self.sessions) >= self.max_sessions:
            return SessionResult(error="too_many_sessions", message=(
                f"{len(self.sessions)} sessions are open; the limit is {self.max_sessions} "
                f"(RNNSERVE_FORECAST_MAX_SESSIONS). Delete sessions you no longer need or retry after "
                f"idle ones expire ({self.ttl_s:g} s)"))
        return None

    def _add(self, state: torch.Tensor, last_bar: Bar | None, bars_seen: int,
             next_forecast: DayForecast | None) -> SessionResult:
        session_id = secrets.token_urlsafe(16)
        session = Session(session_id, state, last_bar, bars_seen, next_forecast, self.clock())
        self.sessions[session_id] = session
        FORECAST_SESSIONS_ACTIVE.labels(self.model_name).set(len(self.sessions))
        return SessionResult(session=self._info(session))

    def _next(self, last: Bar, quantiles: np.ndarray) -> DayForecast:
        """Next-bar forecast from (Q,) log-return quantiles."""
        return to_forecasts(self.spec, last, quantiles[None, :])[0]

    # Operations --------------------------------------------------------------------------------

    @torch.inference_mode()
    def create(self, history: Sequence[Bar] | None = None) -> SessionResult:
        """Opens a session; ``history`` (oldest first, validated upstream) warms its state."""
        with self.lock:
            self.purge_expired()
            if (full := self._room()) is not None:
                return full
            history = list(history or [])
            state = self.model.initial_state(1)  # (S*layers, 1, H)
            next_forecast = None
            if len(history) >= 2:
                x = torch.tensor([row_features(history)], dtype=torch.float32, device=self.device)
                quantiles, state = self.model.sequence(x, state)  # (1, T, Q), (S*layers, 1, H)
                if not bool(torch.isfinite(state).all()):
                    return SessionResult(error="invalid", message="history makes the model's state "
                                         "non-finite; check it for extreme values")
                try:
                    next_forecast = self._next(history[-1], quantiles[0, -1].cpu().numpy())
                except ValueError as exc:
                    return SessionResult(error="invalid", message=f"{exc}; check the history")
            return self._add(state, history[-1] if history else None, len(history), next_forecast)

    def get(self, session_id: str) -> SessionResult:
        with self.lock:
            self.purge_expired()
            found = self._lookup(session_id)
            if isinstance(found, SessionResult):
                return found
            self._touch(found)
            return SessionResult(session=self._info(found))

    def delete(self, session_id: str) -> SessionResult:
        with self.lock:
            self.purge_expired()
            found = self._lookup(session_id)
            if isinstance(found, SessionResult):
                return found
            del self.sessions[session_id]
            FORECAST_SESSIONS_ACTIVE.labels(self.model_name).set(len(self.sessions))
            return SessionResult(session=self._info(found))

    def export(self, session_id: str) -> SessionResult:
        """The session's state, to import on another replica; the session stays open here."""
        with self.lock:
            self.purge_expired()
            found = self._lookup(session_id)
            if isinstance(found, SessionResult):
                return found
            self._touch(found)
            state = SessionState(model_version=self.spec.version, state_shape=list(self.spec.state_shape),
                                 state=found.state.reshape(-1).cpu().tolist(), last_bar=found.last_bar,
                                 bars_seen=found.bars_seen, next=found.next)
            return SessionResult(session=self._info(found), state=state)

    def import_state(self, exported: SessionState) -> SessionResult:
        """Opens a new session from an exported state (same model version only)."""
        def invalid(message: str) -> SessionResult:
            return SessionResult(error="invalid", message=message)

        if exported.model_version != self.spec.version:
            return invalid(f"state was exported from model version {exported.model_version}; this "
                           f"server runs {self.spec.version}. Create a new session with history instead")
        if tuple(exported.state_shape) != tuple(self.spec.state_shape):
            return invalid(f"state_shape {exported.state_shape} does not match the model's "
                           f"{list(self.spec.state_shape)}")
        layers, hidden = self.spec.state_shape
        if len(exported.state) != layers * hidden:
            return invalid(f"state has {len(exported.state)} values; state_shape {layers}x{hidden} "
                           f"needs {layers * hidden}")
        if not all(math.isfinite(v) for v in exported.state):
            return invalid("state holds NaN or infinite values")
        if (exported.bars_seen >= 1) != (exported.last_bar is not None):
            return invalid("last_bar must be set exactly when bars_seen >= 1")
        state = torch.tensor(exported.state, dtype=torch.float32, device=self.device)
        with self.lock:
            self.purge_expired()
            if (full := self._room()) is not None:
                return full
            return self._add(state.view(layers, 1, hidden), exported.last_bar, exported.bars_seen,
                             exported.next)

    def step(self, items: Sequence[StepItem]) -> list[SessionResult]:
        """Advances each item's session by its bar; one batched RNN step per round.

        A session named twice in one batch is advanced in order, one round per repeat.
        """
        results: list[SessionResult | None] = [None] * len(items)
        with self.lock:
            self.purge_expired()
            pending = list(range(len(items)))
            while pending:
                seen: set[str] = set()
                now_round, later = [], []
                for i in pending:
                    (later if items[i].session_id in seen else now_round).append(i)
                    seen.add(items[i].session_id)
                self._step_round(items, now_round, results)
                pending = later
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _step_round(self, items: Sequence[StepItem], indices: list[int],
                    results: list[SessionResult | None]) -> None:
        runnable: list[tuple[int, Session]] = []
        for i in indices:
            item = items[i]
            found = self._lookup(item.session_id)
            if isinstance(found, SessionResult):
                results[i] = found
                FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, "not_found").inc()
                continue
            last = found.last_bar
            if last is not None and item.bar.date <= last.date:
                kind = "duplicates" if item.bar.date == last.date else "is before"
                results[i] = SessionResult(error="invalid", message=(
                    f"bar date {item.bar.date} {kind} the session's last bar {last.date}; each bar "
                    "must be a later day. The session was not changed"))
                FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, "invalid").inc()
                continue
            if last is None:  # the first bar only provides the previous close for the next one
                try:  # ... and a later bar's forecast must have dates
                    business_dates(item.bar.date, 1)
                except ValueError as exc:
                    results[i] = SessionResult(error="invalid", message=f"{exc}; the session was not "
                                               "changed")
                    FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, "invalid").inc()
                    continue
                found.last_bar, found.bars_seen = item.bar, 1
                self._touch(found)
                results[i] = SessionResult(session=self._info(found))
                FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, "ok").inc()
                continue
            runnable.append((i, found))
        if not runnable:
            return
        try:
            outcomes = self._step_rows(items, runnable)
        except Exception:  # a batch-wide failure: step each row alone, so only its culprit fails
            logger.exception("forecast: a batched step of %d sessions failed; stepping them one by one",
                             len(runnable))
            outcomes = []
            for row in runnable:
                try:
                    outcomes += self._step_rows(items, [row])
                except Exception:
                    logger.exception("forecast: the step of one session failed")
                    outcomes.append(SessionResult(error="invalid", message=(
                        "this bar could not be applied; the session was not changed")))
        # Apply only now, when every row's answer is computed: a row either applies fully or not at all.
        for (i, session), outcome in zip(runnable, outcomes, strict=True):
            if isinstance(outcome, SessionResult):
                results[i] = outcome
                FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, "invalid").inc()
                continue
            session.state, session.next = outcome
            session.last_bar = items[i].bar
            session.bars_seen += 1
            self._touch(session)
            results[i] = SessionResult(session=self._info(session))
            FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, "ok").inc()

    def _step_rows(self, items: Sequence[StepItem], runnable: list[tuple[int, Session]]
                   ) -> list[tuple[torch.Tensor, DayForecast] | SessionResult]:
        """One batched ``model.step`` for ``runnable``; each row's (new state, next forecast) or error.

        Changes no session: the caller applies the outcomes.
        """
        features = [bar_features(s.last_bar.close, s.last_bar.volume, items[i].bar.open, items[i].bar.high,
                                 items[i].bar.low, items[i].bar.close, items[i].bar.volume)
                    for i, s in runnable]
        x = torch.tensor(features, dtype=torch.float32, device=self.device)  # (B, F)
        states = torch.cat([s.state for _, s in runnable], dim=1)  # (S*layers, B, H)
        started = time.perf_counter()
        quantiles, states = self.model.step(x, states)  # (B, Q), (S*layers, B, H)
        INFERENCE_SECONDS.labels(NAME).observe(time.perf_counter() - started)
        quantiles = quantiles.cpu().numpy()
        outcomes: list[tuple[torch.Tensor, DayForecast] | SessionResult] = []
        for row, (i, _) in enumerate(runnable):
            if not (np.isfinite(quantiles[row]).all() and bool(torch.isfinite(states[:, row]).all())):
                outcomes.append(SessionResult(error="invalid", message=(
                    "this bar makes the model's output non-finite; check it for extreme values. "
                    "The session was not changed")))
                continue
            try:
                next_forecast = self._next(items[i].bar, quantiles[row])
            except ValueError as exc:
                outcomes.append(SessionResult(error="invalid", message=(
                    f"{exc}; the session was not changed")))
                continue
            outcomes.append((states[:, row:row + 1].clone(), next_forecast))  # (S*layers, 1, H)
        return outcomes


def warm_up_rows(spec: ModelSpec) -> list[Bar]:
    """A plausible window of daily bars, for warming up."""
    day = dt.date(2024, 1, 1)
    return [Bar(date=day + dt.timedelta(days=i), open=100.0, high=101.0 + i % 3, low=99.0,
                close=100.0 + i % 5, volume=1e6 + i) for i in range(spec.window + 2)]


class WindowModel:
    """The forecast artifact for stateless windows, loaded and warmed up at batch 1 and full batch.

    The entry service runs one in each worker (services/inprocess.py); ``Forecast`` below also holds
    one, for its sessions and for serving windows alone.
    """

    def __init__(self, stored, device: str) -> None:
        self.device = device
        self.model, self.metadata, self.model_info = load_stored_model(stored, device)
        self.model_spec = ModelSpec.from_metadata(self.metadata, self.model_info.version)
        # What /v1/forecast/spec answers: fixed by the artifact and the settings.
        self.public_spec = self.model_spec.public(SETTINGS.forecast_max_sessions,
                                                  SETTINGS.forecast_session_ttl_s)
        started = time.perf_counter()
        request = ForecastRequest(rows=warm_up_rows(self.model_spec))
        for batch_size in (1, SETTINGS.forecast_max_batch_size):
            self.forecast([request] * batch_size)
        logger.info("forecast windows %s warmed up on %s in %.2f s", self.model_spec.version, device,
                    time.perf_counter() - started)

    def forecast(self, requests: list[ForecastRequest]) -> list[WindowResult]:
        return forecast_windows(self.model, self.model_spec, requests, self.device)


@bentoml.service(
    name="forecast",
    # Exactly one worker: sessions are this process's memory (see the module docstring).
    workers=1,
    traffic={"timeout": SETTINGS.timeout_s},
    # BentoML 1.4.40's client in the entry service replaces its aiohttp session every 100 requests
    # (default runner_connection.max_requests) and closes the old one while other requests are still
    # in flight on it; under concurrent load those fail with ServerDisconnectedError, i.e. a 500
    # (bentoml/BentoML#5540, #5698). Calls go over a local socket, so never recycling is safe.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
    # Callers reach this service through the entry, which logs every public request: no second
    # access log line per request here; tracing per RNNSERVE_TRACING (services/settings.py).
    **SETTINGS.observability(),
)
class Forecast:
    bento_model = bentoml.models.BentoModel(SETTINGS.forecast_model)

    def __init__(self) -> None:
        torch.set_num_threads(SETTINGS.forecast_threads)
        self.device = SETTINGS.torch_device()
        self.windows = WindowModel(self.bento_model, self.device)
        self.model, self.model_spec, self.model_info = (self.windows.model, self.windows.model_spec,
                                                        self.windows.model_info)
        self.store = SessionStore(self.model, self.model_spec, SETTINGS.forecast_max_sessions,
                                  SETTINGS.forecast_session_ttl_s, device=self.device)
        self._warm_up_sessions()
        self._stop = threading.Event()
        threading.Thread(target=self._expire_loop, name="forecast-session-ttl", daemon=True).start()

    def _warm_up_sessions(self) -> None:
        """A warm-up sequence and batched steps straight on the model (no store, so no session
        metrics move) before ready; windows warmed up in ``WindowModel``."""
        started = time.perf_counter()
        rows = warm_up_rows(self.model_spec)
        with torch.inference_mode():
            x = torch.tensor([row_features(rows)], dtype=torch.float32, device=self.device)
            _, state = self.model.sequence(x, self.model.initial_state(1))
            for batch_size in (1, SETTINGS.forecast_max_batch_size):
                self.model.step(x[:, -1].expand(batch_size, -1), state.expand(-1, batch_size, -1))
        logger.info("forecast sessions %s warmed up on %s in %.2f s", self.model_spec.version, self.device,
                    time.perf_counter() - started)

    def _expire_loop(self) -> None:
        """Expires idle sessions even when no request arrives, so the gauge stays true."""
        period = max(1.0, min(30.0, SETTINGS.forecast_session_ttl_s / 4))
        while not self._stop.wait(period):
            self.store.purge_expired()

    @bentoml.api(
        batchable=SETTINGS.batching == "on",  # "off" only for load/bench.py
        max_batch_size=SETTINGS.forecast_max_batch_size,
        max_latency_ms=SETTINGS.forecast_max_latency_ms,
    )
    def forecast(self, requests: list[ForecastRequest]) -> list[WindowResult]:
        return self.windows.forecast(requests)

    @bentoml.api(
        batchable=SETTINGS.batching == "on",  # "off" only for load/bench.py
        max_batch_size=SETTINGS.forecast_max_batch_size,
        max_latency_ms=SETTINGS.forecast_max_latency_ms,
    )
    def step(self, items: list[StepItem]) -> list[SessionResult]:
        return self.store.step(items)

    @bentoml.api
    def create_session(self, history: list[Bar] | None = None) -> SessionResult:
        return self.store.create(history)

    @bentoml.api
    def get_session(self, session_id: str) -> SessionResult:
        return self.store.get(session_id)

    @bentoml.api
    def delete_session(self, session_id: str) -> SessionResult:
        return self.store.delete(session_id)

    @bentoml.api
    def export_session(self, session_id: str) -> SessionResult:
        return self.store.export(session_id)

    @bentoml.api
    def import_session(self, state: SessionState) -> SessionResult:
        return self.store.import_state(state)

    @bentoml.api
    def spec(self) -> ForecastSpec:
        return self.windows.public_spec

    @bentoml.api
    def info(self) -> ModelInfo:
        return self.model_info


# Entry-side helpers (used by services/api.py) ---------------------------------------------------

ERROR_STATUS = {
    "not_found": HTTPStatus.NOT_FOUND,
    "too_many_sessions": HTTPStatus.TOO_MANY_REQUESTS,
    "invalid": HTTPStatus.BAD_REQUEST,
}


def session_answer(result: object, field: str = "session") -> Any:
    """The ``session`` (or ``state``) of a model-service item, or the HTTP error response it stands for.

    Errors are returned as a response (404, 429 or 400), not raised: the entry service's dependency
    guard (services/errors.py) turns a raised 429 into a 503 "model unavailable", and a full session
    table must read as a clear 429.
    """
    parsed = SessionResult.model_validate(result, from_attributes=True)
    if parsed.error is not None:
        status = ERROR_STATUS.get(parsed.error, HTTPStatus.BAD_REQUEST)
        return JSONResponse({"error": parsed.message or parsed.error}, status_code=int(status))
    return getattr(parsed, field)


def window_response(request: ForecastRequest, result: object, spec: ForecastSpec,
                    model: ModelInfo) -> ForecastResponse:
    """The public answer to one windowed forecast, with the note when rows were ignored."""
    result = WindowResult.model_validate(result, from_attributes=True)
    if result.error is not None:
        raise BentoMLException(result.error, error_code=HTTPStatus.BAD_REQUEST)
    received = len(request.rows)
    note = None
    if received > result.rows_used:
        note = (f"{received} rows were sent; this model reads only the last {result.rows_used} "
                f"(a window of {spec.window} daily returns), so the oldest {received - result.rows_used} "
                "were ignored")
    last = request.rows[-1]
    return ForecastResponse(model=model, last_date=last.date, last_close=last.close,
                            forecasts=result.forecasts, interval=spec.interval,
                            nominal_coverage=spec.nominal_coverage, rows_received=received,
                            rows_used=result.rows_used, note=note)
