"""Forecasts and streaming sessions through real HTTP on a real ``bentoml serve``."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from services.schemas.forecast import EXAMPLE_BARS, FORECAST_EXAMPLE, SESSION_CREATE_EXAMPLE
from tests.conftest import Server, batch_histogram

SESSIONS = "/v1/forecast/sessions"


@pytest.fixture(scope="module")
def spec(client) -> dict:
    response = client.post("/v1/forecast/spec", json={})
    assert response.status_code == 200, response.text
    return response.json()


def create(client, history=None) -> dict:
    response = client.post(SESSIONS, json={} if history is None else {"history": history})
    assert response.status_code == 200, response.text
    return response.json()


def post_retrying_503(http: httpx.Client, route: str, body: dict) -> httpx.Response:
    """POST as a well-behaved client does: a 503 is BentoML's batcher shedding load it predicts it
    cannot serve within max_latency_ms (on a busy CI machine); nothing ran, so retry."""
    for _ in range(50):
        response = http.post(route, json=body)
        if response.status_code != 503:
            return response
        time.sleep(0.1)
    return response


def step(client, session_id: str, bar: dict) -> httpx.Response:
    return post_retrying_503(client, f"{SESSIONS}/step", {"session_id": session_id, "bar": bar})


def log_quantiles(session: dict) -> np.ndarray:
    quantiles = session["next"]["quantiles"]
    return np.log(np.array([quantiles[k] for k in sorted(quantiles, key=float)]) / session["last_close"])


# Windowed forecasts ------------------------------------------------------------------------------


def test_forecast_gives_dated_horizons_with_intervals(client, spec):
    assert spec["rows_needed"] == len(FORECAST_EXAMPLE["rows"])
    response = client.post("/v1/forecast", json=FORECAST_EXAMPLE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == "forecast" and re.fullmatch(r"[0-9a-f]{16}", body["model"]["version"])
    assert [f["horizon"] for f in body["forecasts"]] == list(range(1, FORECAST_EXAMPLE["horizon"] + 1))
    dates = [dt.date.fromisoformat(f["date"]) for f in body["forecasts"]]
    assert dates[0] > dt.date.fromisoformat(EXAMPLE_BARS[-1]["date"])
    assert all(d.weekday() < 5 for d in dates) and dates == sorted(set(dates))
    for forecast in body["forecasts"]:
        assert forecast["lower"] < forecast["point"] < forecast["upper"]
        assert forecast["quantiles"]["0.5"] == forecast["point"]
    assert body["rows_used"] == body["rows_received"] == spec["rows_needed"] and body["note"] is None
    assert body["interval"] == spec["interval"] and body["nominal_coverage"] == pytest.approx(0.8)
    assert "not trading" in body["disclaimer"]


def test_more_rows_than_the_window_are_noted_and_do_not_change_the_forecast(client, spec):
    exact = client.post("/v1/forecast", json=FORECAST_EXAMPLE).json()
    longer = client.post("/v1/forecast", json={**FORECAST_EXAMPLE, "rows": EXAMPLE_BARS}).json()
    extra = len(EXAMPLE_BARS) - spec["rows_needed"]
    assert longer["rows_received"] == len(EXAMPLE_BARS) and longer["rows_used"] == spec["rows_needed"]
    assert f"the oldest {extra} were ignored" in longer["note"]
    for a, b in zip(exact["forecasts"], longer["forecasts"], strict=True):
        assert a["point"] == pytest.approx(b["point"], rel=1e-5)


def test_concurrent_forecasts_are_batched_and_equal_single_calls(client, server):
    before = batch_histogram(client, "forecast", "forecast")
    bodies = [{**FORECAST_EXAMPLE, "rows": EXAMPLE_BARS[i % 20: i % 20 + 61], "horizon": 1 + i % 5}
              for i in range(48)]

    def one(body: dict) -> dict:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            response = post_retrying_503(http, "/v1/forecast", body)
            assert response.status_code == 200, response.text
            return response.json()

    with ThreadPoolExecutor(max_workers=24) as pool:
        concurrent = list(pool.map(one, bodies))
    after = batch_histogram(client, "forecast", "forecast")
    requests, calls = (a - b for a, b in zip(after, before, strict=True))
    assert requests == 48 and calls < requests, f"{calls} model calls for {requests} requests"
    for body, result in zip(bodies[:5], concurrent[:5], strict=True):
        single = client.post("/v1/forecast", json=body).json()
        assert [f["point"] for f in single["forecasts"]] == pytest.approx(
            [f["point"] for f in result["forecasts"]], rel=1e-5)


def bad_bar(**changes) -> dict:
    return {**EXAMPLE_BARS[-1], **changes}


BAD_FORECASTS = [
    ("too few rows", {"rows": EXAMPLE_BARS[:10]}, "rows has 10 bars; this model needs at least 61"),
    ("horizon too large", {**FORECAST_EXAMPLE, "horizon": 6}, "horizon 6 is out of range; this model "
     "forecasts 1 to 5"),
    ("horizon zero", {**FORECAST_EXAMPLE, "horizon": 0}, "greater than or equal to 1"),
    ("unknown quantile", {**FORECAST_EXAMPLE, "quantiles": [0.3]}, "quantile 0.3 is not available"),
    ("NaN price", {"rows": [*EXAMPLE_BARS[:60], bad_bar(close="NaN")]}, "finite number"),
    ("infinite volume", {"rows": [*EXAMPLE_BARS[:60], bad_bar(volume="Infinity")]}, "finite number"),
    ("non-positive price", {"rows": [*EXAMPLE_BARS[:60], bad_bar(low=0)]}, "greater than 0"),
    ("high below low", {"rows": [*EXAMPLE_BARS[:60], bad_bar(high=1.0)]}, "is below low"),
    ("duplicated date", {"rows": [*EXAMPLE_BARS[:60], EXAMPLE_BARS[59]]}, "is duplicated after"),
    ("dates out of order", {"rows": [*EXAMPLE_BARS[1:61], EXAMPLE_BARS[0]]}, "is out of order after"),
    ("unknown field", {**FORECAST_EXAMPLE, "ticker": "TSLA"}, "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_FORECASTS, ids=[c[0] for c in BAD_FORECASTS])
def test_bad_forecast_input_is_a_400_naming_the_reason(client, case, body, message):
    response = client.post("/v1/forecast", json=body)
    assert response.status_code == 400, response.text
    assert message in response.text


def test_nan_literal_in_the_body_is_a_400(client):
    body = json.dumps({"rows": [*EXAMPLE_BARS[:60], bad_bar(open=1.0)]}).replace('"open": 1.0', '"open": NaN')
    response = client.post("/v1/forecast", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


# Sessions -----------------------------------------------------------------------------------------


def test_streaming_n_bars_equals_one_many_to_many_pass_over_them(client):
    """A session fed bar by bar ends where a session warmed with all N bars at once starts."""
    bars = EXAMPLE_BARS[:40]
    streamed = create(client, bars[:2])
    for bar in bars[2:]:
        response = step(client, streamed["session_id"], bar)
        assert response.status_code == 200, response.text
    last_step = response.json()
    at_once = create(client, bars)
    assert last_step["bars_seen"] == at_once["bars_seen"] == 40
    assert last_step["next"]["date"] == at_once["next"]["date"]
    np.testing.assert_allclose(log_quantiles(last_step), log_quantiles(at_once), rtol=1e-4, atol=1e-6)


def test_session_lifecycle_create_step_read_delete(client):
    session = create(client, SESSION_CREATE_EXAMPLE["history"])
    session_id = session["session_id"]
    assert session["bars_seen"] == len(SESSION_CREATE_EXAMPLE["history"]) and session["next"] is not None
    stepped = step(client, session_id, EXAMPLE_BARS[-1]).json()
    assert stepped["bars_seen"] == session["bars_seen"] + 1
    assert stepped["last_date"] == EXAMPLE_BARS[-1]["date"]
    assert stepped["next"]["date"] > EXAMPLE_BARS[-1]["date"]
    read = client.post(f"{SESSIONS}/get", json={"session_id": session_id}).json()
    assert read["next"] == stepped["next"]
    deleted = client.post(f"{SESSIONS}/delete", json={"session_id": session_id})
    assert deleted.status_code == 200 and deleted.json() == {"session_id": session_id, "deleted": True}
    gone = client.post(f"{SESSIONS}/get", json={"session_id": session_id})
    assert gone.status_code == 404 and "unknown or expired" in gone.text


def test_empty_session_needs_two_bars_before_forecasting(client):
    session_id = create(client)["session_id"]
    first = step(client, session_id, EXAMPLE_BARS[0]).json()
    assert first["bars_seen"] == 1 and first["next"] is None
    assert step(client, session_id, EXAMPLE_BARS[1]).json()["next"] is not None


@pytest.mark.parametrize("route", ["step", "get", "delete", "export"])
def test_unknown_session_is_a_404_on_every_route(client, route):
    body = {"session_id": "no-such-session"}
    if route == "step":
        body["bar"] = EXAMPLE_BARS[-1]
    response = client.post(f"{SESSIONS}/{route}", json=body)
    assert response.status_code == 404, response.text
    assert "no-such-session is unknown or expired" in response.text


BAD_STEPS = [
    ("another bar on the same date", {**EXAMPLE_BARS[29], "close": EXAMPLE_BARS[29]["close"] + 1}, 409,
     "is another bar for the date of the session's last bar"),
    ("earlier date", EXAMPLE_BARS[3], 409, "is before the session's last bar"),
    ("NaN close", bad_bar(close="NaN"), 400, "finite number"),
    ("high below low", bad_bar(high=1.0), 400, "is below low"),
    ("negative price", bad_bar(open=-1.0), 400, "greater than 0"),
    ("far date", {**EXAMPLE_BARS[30], "date": "9999-12-31"}, 400, "bar.date"),
]


@pytest.mark.parametrize(("case", "bar", "status", "message"), BAD_STEPS, ids=[c[0] for c in BAD_STEPS])
def test_bad_step_is_a_4xx_and_never_changes_the_session(client, case, bar, status, message):
    session_id = create(client, EXAMPLE_BARS[:30])["session_id"]
    before = client.post(f"{SESSIONS}/export", json={"session_id": session_id}).json()
    response = step(client, session_id, bar)
    assert response.status_code == status, response.text
    assert message in response.text
    after = client.post(f"{SESSIONS}/export", json={"session_id": session_id}).json()
    assert after == before


def test_a_stale_bar_is_a_409_stale_bar_and_a_resent_bar_returns_its_answer(client):
    session_id = create(client, EXAMPLE_BARS[:30])["session_id"]
    first = step(client, session_id, EXAMPLE_BARS[30])
    again = step(client, session_id, EXAMPLE_BARS[30])  # a client's retry after a timeout
    assert again.status_code == 200 and again.json() == first.json() and again.json()["bars_seen"] == 31
    stale = step(client, session_id, EXAMPLE_BARS[29])
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_bar"
    assert stale.json()["error"]["field"] == "bar.date"
    assert step(client, session_id, EXAMPLE_BARS[31]).json()["bars_seen"] == 32


def test_import_refuses_states_no_model_could_reach(client):
    """Issue 13, finding 11: each of these was accepted."""
    exported = client.post(f"{SESSIONS}/export", json={"session_id": create(client, EXAMPLE_BARS[:30])[
        "session_id"]}).json()
    forged_next = {**exported["next"], "point": -5.0, "lower": -6.0, "date": "0001-01-01"}
    cases = [({"state": [1e39, *exported["state"][1:]]}, "not a finite float32"),
             ({"state": [1e30, *exported["state"][1:]]}, "state holds 1e+30"),
             ({"next": forged_next}, "next must forecast a day after last_bar"),
             ({"bars_seen": 10**300}, "bars_seen")]
    for change, message in cases:
        response = client.post(f"{SESSIONS}/import", json={**exported, **change})
        assert response.status_code == 400 and message in response.text, (change.keys(), response.text)
    assert client.post(f"{SESSIONS}/import", json=exported).status_code == 200


def test_a_far_date_among_concurrent_steps_fails_alone_and_changes_nothing(client, server):
    """The probe: a 9999-12-31 step sent with 15 valid ones failed its batch neighbours and advanced
    sessions it answered 400 for. Each answer must match what happened to its session."""
    sessions = [create(client, EXAMPLE_BARS[:30])["session_id"] for _ in range(16)]
    exports = [client.post(f"{SESSIONS}/export", json={"session_id": s}).json() for s in sessions]

    def one(i: int) -> httpx.Response:
        bar = {**EXAMPLE_BARS[30], "date": "9999-12-31"} if i == 0 else EXAMPLE_BARS[30]
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return step(http, sessions[i], bar)

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(one, range(16)))
    assert responses[0].status_code == 400 and responses[0].json()["error"]["field"] == "bar.date"
    assert [r.status_code for r in responses[1:]] == [200] * 15, [r.text for r in responses[1:]]
    assert {r.json()["bars_seen"] for r in responses[1:]} == {31}
    after = client.post(f"{SESSIONS}/export", json={"session_id": sessions[0]}).json()
    assert after == exports[0]
    assert step(client, sessions[0], EXAMPLE_BARS[30]).json()["bars_seen"] == 31  # not stuck


def test_exported_state_resumes_in_a_new_session(client):
    original = create(client, EXAMPLE_BARS[:50])
    exported = client.post(f"{SESSIONS}/export", json={"session_id": original["session_id"]}).json()
    resumed = client.post(f"{SESSIONS}/import", json=exported)
    assert resumed.status_code == 200, resumed.text
    resumed = resumed.json()
    assert resumed["session_id"] != original["session_id"] and resumed["bars_seen"] == 50
    a = step(client, original["session_id"], EXAMPLE_BARS[50]).json()
    b = step(client, resumed["session_id"], EXAMPLE_BARS[50]).json()
    assert a["next"] == b["next"]
    foreign = client.post(f"{SESSIONS}/import", json={**exported, "model_version": "0" * 16})
    assert foreign.status_code == 400 and "exported from model version" in foreign.text


def test_steps_from_many_sessions_are_batched_into_one_rnn_step(client, server):
    sessions = [create(client, EXAMPLE_BARS[:5 + i])["session_id"] for i in range(32)]
    before = batch_histogram(client, "forecast", "step")

    def one(i: int) -> dict:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            response = step(http, sessions[i], EXAMPLE_BARS[5 + i])
            assert response.status_code == 200, response.text
            return response.json()

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    after = batch_histogram(client, "forecast", "step")
    requests, calls = (a - b for a, b in zip(after, before, strict=True))
    assert requests == 32 and calls < requests, f"{calls} step calls for {requests} session steps"
    # Batched steps still equal the per-session truth: a session warmed with the same bars.
    for i in (0, 17, 31):
        warmed = create(client, EXAMPLE_BARS[:6 + i])
        np.testing.assert_allclose(log_quantiles(results[i]), log_quantiles(warmed), rtol=1e-4, atol=1e-6)


def test_metrics_count_sessions_steps_and_requests(client):
    session_id = create(client, EXAMPLE_BARS[:3])["session_id"]
    step(client, session_id, EXAMPLE_BARS[3])
    client.post("/v1/forecast", json=FORECAST_EXAMPLE)
    text = client.get("/metrics").text
    for pattern in (r'rnnserve_forecast_sessions_active\{model="forecast"\} [1-9]',
                    r'rnnserve_forecast_session_steps_total\{model="forecast",outcome="ok"\} [1-9]',
                    r'rnnserve_forecast_requests_total\{model="forecast",outcome="ok"\} [1-9]'):
        assert re.search(pattern, text), pattern


def test_openapi_documents_forecast_and_session_routes(client):
    paths = client.get("/docs.json").json()["paths"]
    for route in ("/v1/forecast", "/v1/forecast/spec", SESSIONS, f"{SESSIONS}/step", f"{SESSIONS}/get",
                  f"{SESSIONS}/delete", f"{SESSIONS}/export", f"{SESSIONS}/import"):
        assert route in paths, route


# Limits: a second server with a tiny session limit and TTL ---------------------------------------

MAX_SESSIONS, TTL_S = 2, 2


@pytest.fixture(scope="module")
def limited(bentoml_home) -> Iterator[httpx.Client]:
    srv = Server(bentoml_home, env={"RNNSERVE_FORECAST_MAX_SESSIONS": str(MAX_SESSIONS),
                                    "RNNSERVE_FORECAST_SESSION_TTL_S": str(TTL_S)}).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            yield http
    finally:
        srv.stop()


def test_session_limit_is_a_clear_429_and_idle_sessions_expire(limited):
    first = create(limited)["session_id"]
    create(limited, EXAMPLE_BARS[:3])
    full = limited.post(SESSIONS, json={"history": EXAMPLE_BARS[:3]})
    assert full.status_code == 429, full.text
    assert full.json()["error"]["code"] == "too_many_sessions"  # the forecast service's own code
    assert full.headers["retry-after"]
    assert f"the limit is {MAX_SESSIONS}" in full.text and "RNNSERVE_FORECAST_MAX_SESSIONS" in full.text
    # Idle sessions expire after the TTL, which frees room and turns their id into a 404.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(TTL_S)
        response = limited.post(f"{SESSIONS}/get", json={"session_id": first})
        if response.status_code == 404:
            break
    assert response.status_code == 404 and "expired" in response.text
    assert create(limited)["bars_seen"] == 0
    text = limited.get("/metrics").text
    assert re.search(r'rnnserve_forecast_session_expirations_total\{model="forecast"\} [1-9]', text)


def test_the_columnar_form_answers_like_rows_over_http(client):
    rows = EXAMPLE_BARS[-61:]
    columns = {name: [row[name] for row in rows]
               for name in ("date", "open", "high", "low", "close", "volume")}
    by_rows = post_retrying_503(client, "/v1/forecast", {"rows": rows, "horizon": 5})
    by_columns = post_retrying_503(client, "/v1/forecast", {**columns, "horizon": 5})
    assert by_rows.status_code == by_columns.status_code == 200, by_columns.text
    assert by_columns.json()["forecasts"] == by_rows.json()["forecasts"]
    assert by_columns.json()["rows_received"] == 61
    short = post_retrying_503(client, "/v1/forecast", {name: values[:5] for name, values in columns.items()})
    assert short.status_code == 400 and short.json()["error"]["field"] == "date", short.text
