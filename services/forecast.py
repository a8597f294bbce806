"""Forecast model service: stateful streaming sessions, and the entry's helpers for forecast answers.

Windowed forecasts run inside the entry service (services/forecasting.py); this service holds the
sessions (services/sessions.py), which live in its one worker's memory.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import bentoml
import torch

from services.errors import ServiceError
from services.forecasting import NAME, ModelSpec, row_features, warm_up_rows
from services.lifecycle import ModelService, model_service_config
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
from services.sessions import SessionStore
from services.settings import SETTINGS

logger = logging.getLogger(__name__)


@bentoml.service(
    name=NAME,
    # One worker (settings enforce it): sessions are this process's memory (services/sessions.py).
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
        self.store = SessionStore(self.model, self.model_spec, SETTINGS.forecast.max_sessions,
                                  SETTINGS.forecast.session_ttl_s, device=self.device)
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

# A session item's error -> the status and code the client gets.
SESSION_ERRORS = {
    "not_found": (404, "session_not_found"),
    "too_many_sessions": (429, "too_many_sessions"),
    "invalid": (400, "invalid_request"),
}


def session_answer(result: object, field: str = "session") -> Any:
    """The ``session`` (or ``state``) of a model-service item; raises the ``ServiceError`` of an error
    item, with its domain code (``session_not_found``, ``too_many_sessions``, ``invalid_request``)."""
    parsed = SessionResult.model_validate(result, from_attributes=True)
    if parsed.error is not None:
        status, code = SESSION_ERRORS.get(parsed.error, (400, "invalid_request"))
        raise ServiceError(status, code, parsed.message or parsed.error)
    return getattr(parsed, field)


def window_response(request: ForecastRequest, result: object, spec: ForecastSpec,
                    model: ModelInfo) -> ForecastResponse:
    """The public answer to one windowed forecast, with the note when rows were ignored."""
    result = WindowResult.model_validate(result, from_attributes=True)
    if result.error is not None:
        raise ServiceError(400, "invalid_request", result.error, "rows")
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
