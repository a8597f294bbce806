"""Forecast sessions: each session's recurrent state, stepped one bar at a time, batched across sessions.

The server keeps each session's hidden state, so a client streaming one new bar pays one RNN step
instead of resending and recomputing a window. Steps of many sessions that arrive together are
computed as ONE batched ``model.step`` call on the stacked states (S*layers, B, H).

``SessionStore`` keeps them in this process's memory, which is why the forecast service runs exactly
one worker. A restart loses every session; clients then get 404 and either create a new session with
history or re-import a state they exported (``export``/``import_state``).
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.forecast import bar_features
from services.forecasting import NAME, ModelSpec, business_dates, row_features, to_forecasts
from services.metrics import (
    FORECAST_SESSION_EXPIRATIONS_TOTAL,
    FORECAST_SESSION_STEPS_TOTAL,
    FORECAST_SESSIONS_ACTIVE,
    INFERENCE_SECONDS,
)
from services.schemas.forecast import Bar, DayForecast, SessionInfo, SessionResult, SessionState, StepItem

logger = logging.getLogger(__name__)


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
