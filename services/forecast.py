"""Forecast model service: stateful streaming sessions, and the entry's helpers for forecast answers.

Windowed forecasts run inside the entry service (services/forecasting.py); this service holds the
sessions (services/sessions.py). In memory (the default) they live in its one worker; with a Redis
session store (``RNNSERVE_FORECAST_SESSION_STORE=redis://...``) any number of workers and replicas
share them, and any of them steps any session.

Readiness: ``/readyz`` answers 200 once the model is loaded, with a JSON body naming each dependency
and whether it answers (``{"ready": true, "dependencies": [{"name": "session_store", ...}]}``). A
Redis that does not answer does not make the service unready: every replica shares it, so taking them
all out of rotation (and, composed, the entry with its sentiment and windowed forecasts) would help no
one; session routes answer 503 ``session_store_unavailable`` with Retry-After instead, and
``rnnserve_forecast_session_store_up`` is 0.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import anyio
import bentoml
import torch
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import ServiceError
from services.forecasting import NAME, ModelSpec, row_features, warm_up_rows
from services.lifecycle import ModelService, model_service_config
from services.metrics import FORECAST_SESSION_STORE_UP
from services.schemas.common import ModelInfo
from services.schemas.forecast import (
    Bar,
    ForecastRequest,
    ForecastResponse,
    ForecastSpec,
    SessionResult,
    SessionState,
    StepItem,
    WindowResult,
)
from services.session_store import SessionBackend, StoreUnavailableError
from services.sessions import SessionStore, make_backend
from services.settings import SETTINGS

logger = logging.getLogger(__name__)


@bentoml.service(
    name=NAME,
    # One worker unless the session store is Redis (settings enforce it): in memory, a session is
    # one process's (services/sessions.py).
    **model_service_config(workers=SETTINGS.forecast.workers),
)
class Forecast(ModelService):
    """Stateful forecast sessions (the entry serves windows itself)."""

    name = NAME
    bento_model = bentoml.models.BentoModel(SETTINGS.forecast.model)
    threads = SETTINGS.forecast.threads

    def setup(self, model: torch.jit.ScriptModule, metadata: dict) -> None:
        self.model = model
        self.model_spec = ModelSpec.from_metadata(metadata, self.model_info.version)
        backend = make_backend(SETTINGS.forecast, self.model_spec.state_shape)
        self.store = SessionStore(self.model, self.model_spec, backend, cell=metadata.get("cell", "gru"),
                                  device=self.device, step_attempts=SETTINGS.forecast.session_step_attempts)
        STORE_HEALTH.backend = backend
        self._stop = threading.Event()
        threading.Thread(target=self._expire_loop, name="forecast-session-ttl", daemon=True).start()

    def warm_up(self) -> None:
        """A warm-up sequence and batched steps straight on the model (no store, so no session
        metrics move)."""
        rows = warm_up_rows(self.model_spec)
        with torch.inference_mode():
            x = torch.tensor([row_features(rows)], dtype=torch.float32, device=self.device)
            _, state = self.model.sequence(x, self.model.initial_state(1))
            for batch_size in (1, SETTINGS.forecast.max_batch_size):
                self.model.step(x[:, -1].expand(batch_size, -1), state.expand(-1, batch_size, -1))

    def _expire_loop(self) -> None:
        """Expires idle sessions even when no request arrives, so the gauge stays true."""
        period = max(1.0, min(30.0, SETTINGS.forecast.session_ttl_s / 4))
        while not self._stop.wait(period):
            self.store.purge_expired()
            STORE_HEALTH.check()

    @bentoml.api(
        batchable=SETTINGS.batching == "on",  # "off" only for load/bench.py
        max_batch_size=SETTINGS.forecast.max_batch_size,
        max_latency_ms=SETTINGS.forecast.max_latency_ms,
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


# Entry-side helpers (used by services/api.py) ---------------------------------------------------

# A session item's error -> the status and code the client gets (SECURITY.md, the error codes).
SESSION_ERRORS = {
    "not_found": (404, "session_not_found"),
    "too_many_sessions": (429, "too_many_sessions"),
    "invalid": (400, "invalid_request"),
    "stale": (409, "stale_bar"),  # a bar dated before (or another bar on) the session's last bar
    "model_version": (409, "session_model_mismatch"),  # stored by another model version
    "unavailable": (503, "session_store_unavailable"),  # Redis unreachable or timed out
    "busy": (503, "session_busy"),  # lost the compare-and-set session_step_attempts times
}
# A step's error -> the request field it is about.
SESSION_ERROR_FIELDS = {"stale": "bar.date", "invalid": None}


def session_answer(result: object, field: str = "session") -> Any:
    """The ``session`` (or ``state``) of a model-service item; raises the ``ServiceError`` of an error
    item, with its domain code (``session_not_found``, ``too_many_sessions``, ``invalid_request``)."""
    parsed = SessionResult.model_validate(result, from_attributes=True)
    if parsed.error is not None:
        status, code = SESSION_ERRORS.get(parsed.error, (400, "invalid_request"))
        raise ServiceError(status, code, parsed.message or parsed.error,
                           SESSION_ERROR_FIELDS.get(parsed.error))
    return getattr(parsed, field)


def window_response(request: ForecastRequest, result: object, spec: ForecastSpec,
                    model: ModelInfo) -> ForecastResponse:
    """The public answer to one windowed forecast, with the note when rows were ignored."""
    result = WindowResult.model_validate(result, from_attributes=True)
    if result.error is not None:
        raise ServiceError(400, "invalid_request", result.error, request.bars_field)
    received = request.bar_count()
    note = None
    if received > result.rows_used:
        note = (f"{received} rows were sent; this model reads only the last {result.rows_used} "
                f"(a window of {spec.window} daily returns), so the oldest {received - result.rows_used} "
                "were ignored")
    last = request.last_bars(1)[0]
    return ForecastResponse(model=model, last_date=last.date, last_close=last.close,
                            forecasts=result.forecasts, interval=spec.interval,
                            nominal_coverage=spec.nominal_coverage, rows_received=received,
                            rows_used=result.rows_used, note=note)


# Readiness of the sessions service ----------------------------------------------------------------


class StoreHealth:
    """Whether the session store answers, checked at most once a second (readiness, the gauge)."""

    def __init__(self, min_interval_s: float = 1.0) -> None:
        self.backend: SessionBackend | None = None
        self.min_interval_s = min_interval_s
        self.checked_at, self.error = float("-inf"), None
        self.lock = threading.Lock()

    def check(self) -> dict[str, Any] | None:
        """The store's entry of ``/readyz`` (None before the model is loaded)."""
        if self.backend is None:
            return None
        with self.lock:
            if time.monotonic() - self.checked_at >= self.min_interval_s:
                try:
                    self.backend.ping()
                    self.error = None
                except StoreUnavailableError as exc:
                    self.error = str(exc)
                self.checked_at = time.monotonic()
                FORECAST_SESSION_STORE_UP.labels(NAME).set(0 if self.error else 1)
        entry = {"name": "session_store", "store": self.backend.describe(), "ready": self.error is None}
        if self.error:
            entry["error"] = self.error[:300]
        return entry


STORE_HEALTH = StoreHealth()


class StoreReadyz:
    """``GET /readyz`` of the forecast service: BentoML's status, with a JSON body that names the
    session store and whether it answers (see the module docstring for why it stays 200)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/readyz":
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []

        async def capture(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, capture)
        if not messages or messages[0].get("status") != 200:  # not ready: BentoML's answer as it is
            for message in messages:
                await send(message)
            return
        entry = await anyio.to_thread.run_sync(STORE_HEALTH.check)
        body = json.dumps({"ready": True, "dependencies": [entry] if entry else []}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


Forecast.add_asgi_middleware(StoreReadyz)
