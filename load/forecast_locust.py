"""Locust users for the forecast endpoints: windowed forecasts, and bars streamed through sessions.

Both replay real TSLA bars from the shipped data (``training/data/stock/TSLA.csv``), starting at random
points, so requests vary in window length, horizon and quantiles like real clients would.
"""

from __future__ import annotations

import random
from pathlib import Path

from locust import FastHttpUser, between, tag, task

from training.forecast_data import read_yahoo_csv

CSV = Path(__file__).resolve().parent.parent / "training" / "data" / "stock" / "TSLA.csv"
BARS = read_yahoo_csv(CSV)
ROWS_NEEDED = 61  # the committed artifact's window + 1; a smaller request is a 400 by design
QUANTILE_CHOICES = (None, [0.5], [0.1, 0.9], [0.1, 0.5, 0.9])


class ForecastWindowUser(FastHttpUser):
    """Stateless client: resends a window of rows (sometimes more than the model reads)."""

    wait_time = between(0.0, 0.05)

    @tag("forecast")
    @task
    def forecast(self) -> None:
        rows = random.choice((ROWS_NEEDED, ROWS_NEEDED, ROWS_NEEDED + 20, 250))
        end = random.randint(rows, len(BARS))
        horizon = random.randint(1, 5)
        body = {"rows": BARS.rows(end - rows, end), "horizon": horizon,
                "quantiles": random.choice(QUANTILE_CHOICES)}
        with self.client.post("/v1/forecast", json=body, name="/v1/forecast",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            data = response.json()
            forecasts = data.get("forecasts", [])
            if len(forecasts) != horizon or data.get("rows_used") != ROWS_NEEDED:
                response.failure(f"{len(forecasts)} forecasts for horizon {horizon}, "
                                 f"rows_used {data.get('rows_used')}")
            elif (rows > ROWS_NEEDED) != (data.get("note") is not None):
                response.failure(f"note {data.get('note')!r} for {rows} rows")
            elif any(not f["lower"] <= f["point"] <= f["upper"] for f in forecasts):
                response.failure(f"interval does not hold the point: {forecasts[0]}")
            else:
                response.success()


class ForecastSessionUser(FastHttpUser):
    """Stateful client: opens a session with some history, then streams one bar per step.

    After ``bars_per_session`` steps it deletes the session and opens another, so sessions churn
    like real streams do and the server's session count stays bounded.
    """

    wait_time = between(0.0, 0.05)
    bars_per_session = 50

    def on_start(self) -> None:
        self.session_id: str | None = None
        self.position = 0
        self.remaining = 0

    def on_stop(self) -> None:
        self._delete()

    def _open(self) -> None:
        history = random.choice((0, 2, 30, 120))
        self.position = random.randint(history, len(BARS) - self.bars_per_session - 1)
        body = {"history": BARS.rows(self.position - history, self.position)} if history else {}
        with self.client.post("/v1/forecast/sessions", json=body, name="/v1/forecast/sessions",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            self.session_id = response.json()["session_id"]
            self.remaining = self.bars_per_session
            response.success()

    def _delete(self) -> None:
        if self.session_id is None:
            return
        self.client.post("/v1/forecast/sessions/delete", json={"session_id": self.session_id},
                         name="/v1/forecast/sessions/delete")
        self.session_id = None

    @tag("forecast_sessions")
    @task
    def step(self) -> None:
        if self.session_id is None or self.remaining <= 0:
            self._delete()
            self._open()
            if self.session_id is None:
                return
        bar = BARS.rows(self.position, self.position + 1)[0]
        with self.client.post("/v1/forecast/sessions/step", json={"session_id": self.session_id,
                                                                  "bar": bar},
                              name="/v1/forecast/sessions/step", catch_response=True) as response:
            if response.status_code == 503:  # shed by the batcher before any work: retry the bar
                response.failure("503: shed by the batcher (session unchanged)")
                return
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                self.session_id = None  # expired or lost on a restart: open a new one
                return
            data = response.json()
            if data.get("last_date") != bar["date"]:
                response.failure(f"session at {data.get('last_date')}, expected {bar['date']}")
            elif data.get("bars_seen", 0) >= 2 and data.get("next") is None:
                response.failure("no next-bar forecast after two bars")
            else:
                response.success()
        self.position += 1
        self.remaining -= 1
