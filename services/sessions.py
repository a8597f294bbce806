"""Forecast sessions: each session's recurrent state, stepped one bar at a time, batched across sessions.

The server keeps each session's hidden state, so a client streaming one new bar pays one RNN step
instead of resending and recomputing a window. Steps of many sessions that arrive together are
computed as ONE batched ``model.step`` call on the stacked states (S*layers, B, H).

Where states live is a ``SessionBackend`` (services/session_store.py): this process's memory by
default, or Redis (services/redis_sessions.py, ``RNNSERVE_FORECAST_SESSION_STORE=redis://...``), which
every worker and replica shares and which survives restarts. A step is optimistic: read the batch's
records (one round trip), run the model, write every new state with a compare-and-set on the version
read (one round trip). A step that lost the race to another worker's step of the same session is
re-read and tried again, so two steps of one session never both apply to one state and no bar is lost.

What a step answers, by the bar's date against the session's last bar:

- later: applied; the new forecast (200);
- the same bar again (a client retrying after a timeout): the stored answer, not stepped twice (200);
- the same date with other values, or an earlier date: ``stale`` (409 ``stale_bar``), unchanged.

Errors are returned as ``SessionResult(error=...)`` items rather than raised, so one bad item of a
batched step never fails its neighbours; ``services/forecast.py`` maps them to their status and code.
A call that returns an error never changes any session.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Sequence

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
from services.session_checks import check_state
from services.session_store import MemoryBackend, Record, SessionBackend, StoreUnavailableError
from services.settings import ForecastSettings

logger = logging.getLogger(__name__)


def make_backend(settings: ForecastSettings, state_shape: tuple[int, int]) -> SessionBackend:
    """The store ``settings.session_store`` names, for states of ``state_shape`` (S*layers, H)."""
    if settings.session_store == "memory":
        return MemoryBackend(settings.max_sessions, settings.session_ttl_s)
    from services.redis_sessions import RedisBackend  # redis is imported only when used

    return RedisBackend(settings.session_store, settings.max_sessions, settings.session_ttl_s,
                        state_shape=state_shape, timeout_s=settings.session_store_timeout_s)


class SessionStore:
    """Every open session of one model: create, read, step, export, import, delete."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, backend: SessionBackend, *,
                 cell: str = "gru", device: str = "cpu", model_name: str = NAME,
                 step_attempts: int = 8) -> None:
        self.model, self.spec, self.backend, self.device = model, spec, backend, device
        self.cell, self.model_name, self.step_attempts = cell, model_name, step_attempts
        backend.on_purge = self._purged
        FORECAST_SESSIONS_ACTIVE.labels(model_name).set(0)

    # Bookkeeping -------------------------------------------------------------------------------

    def _purged(self, expired: int, open_sessions: int) -> None:
        FORECAST_SESSION_EXPIRATIONS_TOTAL.labels(self.model_name).inc(expired)
        FORECAST_SESSIONS_ACTIVE.labels(self.model_name).set(open_sessions)

    def purge_expired(self) -> int:
        """Drops sessions idle for longer than the TTL; returns how many (0 when the store is down)."""
        try:
            expired, open_sessions = self.backend.purge_expired()
        except StoreUnavailableError:
            return 0
        FORECAST_SESSIONS_ACTIVE.labels(self.model_name).set(open_sessions)
        return expired

    def _unavailable(self, exc: StoreUnavailableError) -> SessionResult:
        return SessionResult(error="unavailable", message=(
            f"the session store ({self.backend.describe()}) did not answer ({exc}). Retry shortly: a "
            "step sent again is applied once, whether or not this attempt reached the store"))

    def _not_found(self, session_id: str) -> SessionResult:
        ttl = self.backend.ttl_s
        if self.backend.expired_recently(session_id):
            message = f"session {session_id} expired after more than {ttl:g} s idle"
        else:
            message = f"session {session_id} is unknown or expired (sessions expire after {ttl:g} s idle)"
        return SessionResult(error="not_found", message=message + "; create a new one")

    def _foreign(self, session_id: str, record: Record) -> SessionResult | None:
        if record.model_version == self.spec.version:
            return None
        return SessionResult(error="model_version", message=(
            f"session {session_id} holds a state of model version {record.model_version}; this server "
            f"runs {self.spec.version}, which cannot continue it. Create a new session with history"))

    def _lookup(self, session_id: str, record: Record | None) -> Record | SessionResult:
        if record is None:
            return self._not_found(session_id)
        return self._foreign(session_id, record) or record

    def _info(self, session_id: str, record: Record) -> SessionInfo:
        last = record.last_bar
        return SessionInfo(session_id=session_id, model_version=record.model_version,
                           bars_seen=record.bars_seen, last_date=last.date if last else None,
                           last_close=last.close if last else None, ttl_s=int(self.backend.ttl_s),
                           next=record.next)

    def _add(self, state: torch.Tensor, last_bar: Bar | None, bars_seen: int,
             next_forecast: DayForecast | None) -> SessionResult:
        record = Record(version=1, model_version=self.spec.version, state=state, last_bar=last_bar,
                        bars_seen=bars_seen, next=next_forecast)
        try:
            created = self.backend.create(secrets.token_urlsafe(16), record)
        except StoreUnavailableError as exc:
            return self._unavailable(exc)
        FORECAST_SESSIONS_ACTIVE.labels(self.model_name).set(created.open_sessions)
        if created.session_id is None:
            return SessionResult(error="too_many_sessions", message=(
                f"{created.open_sessions} sessions are open; the limit is {self.backend.max_sessions} "
                f"(RNNSERVE_FORECAST_MAX_SESSIONS). Delete sessions you no longer need or retry after "
                f"idle ones expire ({self.backend.ttl_s:g} s)"))
        return SessionResult(session=self._info(created.session_id, record))

    def _next(self, last: Bar, quantiles: np.ndarray) -> DayForecast:
        """Next-bar forecast from (Q,) log-return quantiles."""
        return to_forecasts(self.spec, last, quantiles[None, :])[0]

    # Operations --------------------------------------------------------------------------------

    @torch.inference_mode()
    def create(self, history: Sequence[Bar] | None = None) -> SessionResult:
        """Opens a session; ``history`` (oldest first, validated upstream) warms its state."""
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

    def _read_one(self, session_id: str) -> Record | SessionResult:
        try:
            [record] = self.backend.read([session_id], touch=True)
        except StoreUnavailableError as exc:
            return self._unavailable(exc)
        return self._lookup(session_id, record)

    def get(self, session_id: str) -> SessionResult:
        found = self._read_one(session_id)
        return found if isinstance(found, SessionResult) else SessionResult(
            session=self._info(session_id, found))

    def delete(self, session_id: str) -> SessionResult:
        try:
            record, open_sessions = self.backend.delete(session_id)
        except StoreUnavailableError as exc:
            return self._unavailable(exc)
        FORECAST_SESSIONS_ACTIVE.labels(self.model_name).set(open_sessions)
        if record is None:
            return self._not_found(session_id)
        return SessionResult(session=self._info(session_id, record))

    def export(self, session_id: str) -> SessionResult:
        """The session's state, to import on another replica; the session stays open here."""
        found = self._read_one(session_id)
        if isinstance(found, SessionResult):
            return found
        state = SessionState(model_version=found.model_version, state_shape=list(self.spec.state_shape),
                             state=found.state.reshape(-1).cpu().tolist(), last_bar=found.last_bar,
                             bars_seen=found.bars_seen, next=found.next)
        return SessionResult(session=self._info(session_id, found), state=state)

    def import_state(self, exported: SessionState) -> SessionResult:
        """Opens a new session from an exported state: same model version only, and only a state this
        model could have reached (the schema checked what needs no model: float32 range, dates)."""
        if (problem := check_state(self.spec, self.cell, exported)) is not None:
            return SessionResult(error="invalid", message=problem)
        layers, hidden = self.spec.state_shape
        state = torch.tensor(exported.state, dtype=torch.float32, device=self.device)
        return self._add(state.view(layers, 1, hidden), exported.last_bar, exported.bars_seen,
                         exported.next)

    # Steps -------------------------------------------------------------------------------------

    def step(self, items: Sequence[StepItem]) -> list[SessionResult]:
        """Advances each item's session by its bar; one batched RNN step and one write per round.

        A session named twice in one batch is advanced in date order, one round per bar; an item
        whose write lost to another worker's step is re-read and retried in the next round.
        """
        results: list[SessionResult | None] = [None] * len(items)
        queues: dict[str, list[int]] = {}
        for i in sorted(range(len(items)), key=lambda i: items[i].bar.date):
            queues.setdefault(items[i].session_id, []).append(i)
        attempts = [0] * len(items)
        while queues:
            indices = [queue[0] for queue in queues.values()]
            try:
                lost = self._step_round(items, indices, results)
            except StoreUnavailableError as exc:
                for queue in queues.values():
                    for i in queue:
                        results[i] = self._unavailable(exc)
                        FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, "unavailable").inc()
                break
            for i in indices:
                attempts[i] += 1
                if i in lost and attempts[i] >= self.step_attempts:
                    results[i] = SessionResult(error="busy", message=(
                        f"session {items[i].session_id} was stepped by other requests {attempts[i]} "
                        "times while this bar was computed; it was not applied. Retry it"))
                    FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, "busy").inc()
                if i not in lost or results[i] is not None:
                    queue = queues[items[i].session_id]
                    queue.pop(0)
                    if not queue:
                        del queues[items[i].session_id]
        return results  # type: ignore[return-value]

    def _refuse(self, results: list, i: int, result: SessionResult, outcome: str) -> None:
        results[i] = result
        FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, outcome).inc()

    @torch.inference_mode()
    def _step_round(self, items: Sequence[StepItem], indices: list[int],
                    results: list[SessionResult | None]) -> set[int]:
        """One round (at most one item per session): read, step, compare-and-set. Returns the items
        whose write lost to a concurrent step (to retry); the others have their result."""
        records = self.backend.read([items[i].session_id for i in indices])
        runnable: list[tuple[int, Record]] = []
        writes: list[tuple[int, Record, Record]] = []  # (item, record read, new record)
        for i, record in zip(indices, records, strict=True):
            item = items[i]
            found = self._lookup(item.session_id, record)
            if isinstance(found, SessionResult):
                self._refuse(results, i, found, found.error)
                continue
            last = found.last_bar
            if last is not None and item.bar.date <= last.date:
                if item.bar == last:  # a retry of the bar last applied: its answer, not a second step
                    self._refuse(results, i, SessionResult(session=self._info(item.session_id, found)),
                                 "duplicate")
                    continue
                kind = ("is another bar for the date of" if item.bar.date == last.date else "is before")
                self._refuse(results, i, SessionResult(error="stale", message=(
                    f"bar date {item.bar.date} {kind} the session's last bar {last.date}; each bar must "
                    "be a later day (re-sending the last bar itself returns its answer). The session "
                    "was not changed")), "stale")
                continue
            if last is None:  # the first bar only provides the previous close for the next one
                try:  # ... and a later bar's forecast must have dates
                    business_dates(item.bar.date, 1)
                except ValueError as exc:
                    self._refuse(results, i, SessionResult(error="invalid", message=(
                        f"{exc}; the session was not changed")), "invalid")
                    continue
                writes.append((i, found, dataclasses.replace(found, version=found.version + 1,
                                                              last_bar=item.bar, bars_seen=1)))
                continue
            runnable.append((i, found))
        for (i, record), outcome in zip(runnable, self._step_all(items, runnable), strict=True):
            if isinstance(outcome, SessionResult):
                self._refuse(results, i, outcome, "invalid")
                continue
            state, next_forecast = outcome
            writes.append((i, record, dataclasses.replace(
                record, version=record.version + 1, state=state, last_bar=items[i].bar,
                bars_seen=record.bars_seen + 1, next=next_forecast)))
        # Apply only now, when every row's answer is computed: a row either applies fully or not at all.
        applied = self.backend.write([(items[i].session_id, old.version, new) for i, old, new in writes])
        lost = set()
        for (i, _, new), ok in zip(writes, applied, strict=True):
            if ok:
                results[i] = SessionResult(session=self._info(items[i].session_id, new))
                FORECAST_SESSION_STEPS_TOTAL.labels(self.model_name, "ok").inc()
            else:
                lost.add(i)
        return lost

    def _step_all(self, items: Sequence[StepItem], runnable: list[tuple[int, Record]]
                  ) -> list[tuple[torch.Tensor, DayForecast] | SessionResult]:
        """``_step_rows`` for every row; a batch-wide failure is retried row by row, so that only its
        culprit fails."""
        if not runnable:
            return []
        try:
            return self._step_rows(items, runnable)
        except Exception:
            logger.exception("forecast: a batched step of %d sessions failed; stepping them one by one",
                             len(runnable))
        outcomes: list[tuple[torch.Tensor, DayForecast] | SessionResult] = []
        for row in runnable:
            try:
                outcomes += self._step_rows(items, [row])
            except Exception:
                logger.exception("forecast: the step of one session failed")
                outcomes.append(SessionResult(error="invalid", message=(
                    "this bar could not be applied; the session was not changed")))
        return outcomes

    def _step_rows(self, items: Sequence[StepItem], runnable: list[tuple[int, Record]]
                   ) -> list[tuple[torch.Tensor, DayForecast] | SessionResult]:
        """One batched ``model.step`` for ``runnable``; each row's (new state, next forecast) or error.

        Changes no session: the caller writes the outcomes.
        """
        features = [bar_features(r.last_bar.close, r.last_bar.volume, items[i].bar.open, items[i].bar.high,
                                 items[i].bar.low, items[i].bar.close, items[i].bar.volume)
                    for i, r in runnable]
        x = torch.tensor(features, dtype=torch.float32, device=self.device)  # (B, F)
        states = torch.cat([r.state.to(self.device) for _, r in runnable], dim=1)  # (S*layers, B, H)
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
