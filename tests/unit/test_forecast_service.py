"""The forecast service's pure helpers and session store, on a tiny fixed-weight scripted model.

Session tests run against both stores: in memory, and a real ``redis-server`` started on a free port
(tests/redis_fixtures.py; skipped, saying why, only when it cannot be started).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import secrets
from http import HTTPStatus

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.forecast import FEATURES, ForecastConfig, ForecastRNN, bar_features
from services.errors import ServiceError
from services.forecast import session_answer, window_response
from services.forecasting import ModelSpec, business_dates, forecast_windows, row_features
from services.metrics import FORECAST_SESSION_EXPIRATIONS_TOTAL, FORECAST_SESSIONS_ACTIVE
from services.redis_sessions import RedisBackend
from services.schemas.common import ModelInfo
from services.schemas.forecast import (
    EXAMPLE_BARS,
    FORECAST_EXAMPLE,
    Bar,
    ForecastRequest,
    SessionResult,
    SessionState,
    StepItem,
    check_forecast,
)
from services.session_store import MemoryBackend
from services.sessions import SessionStore
from tests.redis_fixtures import redis_server  # noqa: F401 - a fixture
from training.export import script

WINDOW = 8
BARS = [Bar.model_validate(row) for row in EXAMPLE_BARS]  # 90 real TSLA bars


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(11)
    eager = ForecastRNN(ForecastConfig(hidden_size=6, cell="lstm", horizons=3, dropout=0.0))
    eager.set_normalisation(torch.zeros(len(FEATURES)), torch.full((len(FEATURES),), 0.03), 0.03)
    return script(eager)


@pytest.fixture(scope="module")
def spec():
    return ModelSpec(version="0123456789abcdef", window=WINDOW, horizons=3, quantiles=(0.1, 0.5, 0.9),
                     interval=(0.1, 0.9), state_shape=(2, 6))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def memory_store(model, spec, max_sessions: int = 10, ttl_s: float = 60.0, clock=None) -> SessionStore:
    return SessionStore(model, spec, MemoryBackend(max_sessions, ttl_s, clock=clock or Clock()),
                        cell="lstm", model_name="unit_test")


def redis_store(url: str, model, spec, max_sessions: int = 10, ttl_s: float = 60.0) -> SessionStore:
    """A store on its own key prefix of the shared test Redis, so tests never see each other's."""
    backend = RedisBackend(url, max_sessions, ttl_s, spec.state_shape, timeout_s=5.0,
                           prefix=f"unit:{secrets.token_hex(8)}:")
    return SessionStore(model, spec, backend, cell="lstm", model_name="unit_test")


@pytest.fixture(params=["memory", "redis"])
def store(request):
    """``store(model, spec, max_sessions=..., ttl_s=...)`` of the parametrized kind."""
    if request.param == "memory":
        return memory_store
    url = request.getfixturevalue("redis_server").url
    return lambda *args, **kwargs: redis_store(url, *args, **kwargs)


def expected_next(model, rows: list[Bar]) -> np.ndarray:
    """Next-bar log-return quantiles after every bar, from ONE many-to-many pass. (N-1, Q)"""
    x = torch.tensor([row_features(rows)], dtype=torch.float32)
    with torch.no_grad():
        quantiles, _ = model.sequence(x, model.initial_state(1))
    return quantiles[0].numpy()


def assert_same_forecasts(a, b) -> None:
    """Equal up to float32 rounding (a batch and a single call take different GEMM paths)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.horizon, x.date, set(x.quantiles)) == (y.horizon, y.date, set(y.quantiles))
        for key in ("point", "lower", "upper", "log_return"):
            assert getattr(x, key) == pytest.approx(getattr(y, key), rel=1e-5, abs=1e-7)


def log_quantiles(result: SessionResult) -> np.ndarray:
    forecast = result.session.next
    return np.log(np.array([forecast.quantiles[k] for k in ("0.1", "0.5", "0.9")])
                  / result.session.last_close)


# Windowed forecasts ------------------------------------------------------------------------------


def test_business_dates_skip_weekends():
    friday = dt.date(2025, 6, 27)
    assert business_dates(friday, 3) == [dt.date(2025, 6, 30), dt.date(2025, 7, 1), dt.date(2025, 7, 2)]
    assert business_dates(dt.date(2025, 6, 28), 1) == [dt.date(2025, 6, 30)]  # from a Saturday


def test_batched_windows_equal_single_calls_and_read_only_the_last_window(model, spec):
    requests = [ForecastRequest(rows=BARS[: WINDOW + 1 + k], horizon=1 + k % 3) for k in range(5)]
    batched = forecast_windows(model, spec, requests)
    for request, result in zip(requests, batched, strict=True):
        (single,) = forecast_windows(model, spec, [request])
        assert single.rows_used == result.rows_used
        assert_same_forecasts(single.forecasts, result.forecasts)
        assert result.rows_used == WINDOW + 1
        assert [f.horizon for f in result.forecasts] == list(range(1, (request.horizon or 3) + 1))
        for forecast in result.forecasts:
            assert forecast.lower <= forecast.point <= forecast.upper
            assert forecast.quantiles["0.5"] == forecast.point
    # Older rows than the window do not change the answer.
    long = forecast_windows(model, spec, [ForecastRequest(rows=BARS[:40])])[0]
    short = forecast_windows(model, spec, [ForecastRequest(rows=BARS[40 - WINDOW - 1:40])])[0]
    assert_same_forecasts(long.forecasts, short.forecasts)


def test_forecast_prices_follow_the_model_quantiles(model, spec):
    rows = BARS[:WINDOW + 1]
    (result,) = forecast_windows(model, spec, [ForecastRequest(rows=rows, quantiles=[0.9])])
    with torch.no_grad():
        quantiles = model(torch.tensor([row_features(rows)], dtype=torch.float32))[0].numpy()
    last = rows[-1].close
    for h, forecast in enumerate(result.forecasts):
        assert forecast.point == pytest.approx(last * math.exp(quantiles[h, 1]), rel=1e-5)
        assert forecast.upper == pytest.approx(last * math.exp(quantiles[h, 2]), rel=1e-5)
        assert set(forecast.quantiles) == {"0.9"}
        assert forecast.date == business_dates(rows[-1].date, 3)[h]


def test_response_notes_ignored_rows(model, spec):
    public = spec.public(10, 60)
    info = ModelInfo(name="forecast", version=spec.version, task="forecast", cell="lstm")
    exact = ForecastRequest(rows=BARS[:WINDOW + 1])
    response = window_response(exact, forecast_windows(model, spec, [exact])[0], public, info)
    assert (response.rows_received, response.rows_used, response.note) == (WINDOW + 1, WINDOW + 1, None)
    extra = ForecastRequest(rows=BARS[:30])
    response = window_response(extra, forecast_windows(model, spec, [extra])[0], public, info)
    assert response.rows_used == WINDOW + 1
    assert "30 rows were sent" in response.note and "oldest 21 were ignored" in response.note
    assert "not trading" in response.disclaimer


# Validation ---------------------------------------------------------------------------------------


def bar(**changes) -> dict:
    return {**EXAMPLE_BARS[-1], **changes}


@pytest.mark.parametrize(("changes", "message"), [
    ({"close": float("nan")}, "finite number"),
    ({"open": float("inf")}, "finite number"),
    ({"low": 0.0}, "greater than 0"),
    ({"close": -3.0}, "greater than 0"),
    ({"volume": -1.0}, "greater than or equal to 0"),
    ({"high": 100.0, "low": 101.0}, "high 100.0 is below low 101.0"),
    ({"date": "2025-13-01"}, "date"),
    ({"low": 1e-9}, "low 1e-09 is below the minimum price 1e-06"),
    ({"high": 2e9}, "less than or equal to 1000000000"),
])
def test_bad_bars_are_rejected_with_the_reason(changes, message):
    with pytest.raises(ValidationError, match=message):
        Bar.model_validate(bar(**changes))


@pytest.mark.parametrize(("rows", "message"), [
    ([EXAMPLE_BARS[1], EXAMPLE_BARS[0]], "out of order"),
    ([EXAMPLE_BARS[0], EXAMPLE_BARS[0]], "duplicated"),
    ([EXAMPLE_BARS[0]], "at least 2"),
])
def test_rows_must_be_strictly_increasing(rows, message):
    with pytest.raises(ValidationError, match=message):
        ForecastRequest(rows=rows)


def test_model_limits_name_the_limit(spec):
    public = spec.public(10, 60)
    with pytest.raises(ValueError, match=f"rows has 5 bars; this model needs at least {WINDOW + 1}"):
        check_forecast(ForecastRequest(rows=EXAMPLE_BARS[:5]), public)
    with pytest.raises(ValueError, match="horizon 4 is out of range; this model forecasts 1 to 3"):
        check_forecast(ForecastRequest(rows=EXAMPLE_BARS[:20], horizon=4), public)
    unavailable = r"quantile 0.25 is not available; choose from \[0.1, 0.5, 0.9\]"
    with pytest.raises(ValueError, match=unavailable) as raised:
        check_forecast(ForecastRequest(rows=EXAMPLE_BARS[:20], quantiles=[0.5, 0.25]), public)
    assert raised.value.field == "quantiles[1]"
    with pytest.raises(ValidationError, match="less than or equal to 64"):
        ForecastRequest(rows=EXAMPLE_BARS[:20], horizon=65)
    ForecastRequest.model_validate(FORECAST_EXAMPLE)


@pytest.mark.parametrize(("error", "status", "code"), [
    ("not_found", HTTPStatus.NOT_FOUND, "session_not_found"),
    ("too_many_sessions", HTTPStatus.TOO_MANY_REQUESTS, "too_many_sessions"),
    ("invalid", HTTPStatus.BAD_REQUEST, "invalid_request")])
def test_error_items_raise_their_domain_code(error, status, code):
    with pytest.raises(ServiceError) as raised:
        session_answer(SessionResult(error=error, message="why"))
    assert (raised.value.status, raised.value.code, raised.value.message) == (status, code, "why")


def test_a_good_item_answers_its_session_or_state(model, spec, store):
    sessions = store(model, spec)
    created = sessions.create(BARS[:3])
    assert session_answer(created) == created.session
    exported = sessions.export(created.session.session_id)
    assert session_answer(exported, "state") == exported.state


# Sessions -----------------------------------------------------------------------------------------


def test_streaming_bars_one_by_one_equals_one_many_to_many_pass(model, spec, store):
    sessions = store(model, spec)
    created = sessions.create()
    session_id = created.session.session_id
    assert created.session.bars_seen == 0 and created.session.next is None
    first = sessions.step([StepItem(session_id=session_id, bar=BARS[0])])[0]
    assert first.session.next is None  # one bar gives no return yet
    expected = expected_next(model, BARS[:40])
    for t in range(1, 40):
        result = sessions.step([StepItem(session_id=session_id, bar=BARS[t])])[0]
        np.testing.assert_allclose(log_quantiles(result), expected[t - 1], rtol=1e-4, atol=1e-5)
    assert result.session.bars_seen == 40


def test_history_warms_the_state_like_streaming_it(model, spec, store):
    sessions = store(model, spec)
    warm = sessions.create(BARS[:20]).session
    streamed = sessions.create(BARS[:5]).session.session_id
    for t in range(5, 20):
        last = sessions.step([StepItem(session_id=streamed, bar=BARS[t])])[0]
    np.testing.assert_allclose(log_quantiles(last), log_quantiles(SessionResult(session=warm)),
                               rtol=1e-4, atol=1e-6)
    assert warm.next.date == business_dates(BARS[19].date, 1)[0]


def test_steps_of_many_sessions_are_one_batch_and_equal_separate_steps(model, spec, store):
    together, apart = store(model, spec), store(model, spec)
    histories = [BARS[:10], BARS[:25], BARS[:3]]
    ids_together = [together.create(h).session.session_id for h in histories]
    ids_apart = [apart.create(h).session.session_id for h in histories]
    new_bars = [BARS[10], BARS[25], BARS[3]]
    batched = together.step([StepItem(session_id=s, bar=b) for s, b in zip(ids_together, new_bars,
                                                                               strict=True)])
    for session_id, new_bar, result in zip(ids_apart, new_bars, batched, strict=True):
        (single,) = apart.step([StepItem(session_id=session_id, bar=new_bar)])
        np.testing.assert_allclose(log_quantiles(result), log_quantiles(single), rtol=1e-5, atol=1e-6)


def test_a_session_twice_in_one_batch_advances_in_order(model, spec, store):
    sessions = store(model, spec)
    session_id = sessions.create(BARS[:10]).session.session_id
    results = sessions.step([StepItem(session_id=session_id, bar=BARS[10]),
                             StepItem(session_id=session_id, bar=BARS[11])])
    assert [r.session.bars_seen for r in results] == [11, 12]
    np.testing.assert_allclose(log_quantiles(results[1]), expected_next(model, BARS[:12])[-1],
                               rtol=1e-4, atol=1e-6)


def test_bad_step_and_unknown_session_never_change_a_session(model, spec, store):
    sessions = store(model, spec)
    session_id = sessions.create(BARS[:10]).session.session_id
    before = sessions.export(session_id).state
    other = BARS[9].model_copy(update={"close": BARS[9].close + 1})
    results = sessions.step([StepItem(session_id=session_id, bar=other),  # another bar, same date
                             StepItem(session_id=session_id, bar=BARS[4]),  # earlier date
                             StepItem(session_id="missing", bar=BARS[10])])
    assert [r.error for r in results] == ["stale", "stale", "not_found"]
    assert "is another bar for the date of the session's last bar" in results[0].message
    assert "is before the session's last bar" in results[1].message
    assert "unknown or expired" in results[2].message
    assert sessions.export(session_id).state == before
    with pytest.raises(ServiceError) as raised:
        session_answer(results[0])
    assert (raised.value.status, raised.value.code, raised.value.field) == (409, "stale_bar", "bar.date")


def test_resending_the_last_bar_answers_it_again_without_a_second_step(model, spec, store):
    """A client that timed out retries its bar: it gets the answer it missed, and the state is
    stepped once; a bar sent twice in one batch is applied once too."""
    sessions = store(model, spec)
    session_id = sessions.create(BARS[:10]).session.session_id
    [first] = sessions.step([StepItem(session_id=session_id, bar=BARS[10])])
    after_first = sessions.export(session_id).state
    [again] = sessions.step([StepItem(session_id=session_id, bar=BARS[10])])
    assert again == first and again.session.bars_seen == 11
    assert sessions.export(session_id).state == after_first
    both = sessions.step([StepItem(session_id=session_id, bar=BARS[11]),
                          StepItem(session_id=session_id, bar=BARS[11])])
    assert both[0] == both[1] and both[0].session.bars_seen == 12


def test_idle_sessions_expire_after_the_ttl(model, spec):
    clock = Clock()
    sessions = memory_store(model, spec, ttl_s=30, clock=clock)
    expirations = FORECAST_SESSION_EXPIRATIONS_TOTAL.labels("unit_test")
    before = expirations._value.get()
    idle = sessions.create(BARS[:5]).session.session_id
    clock.now += 20
    busy = sessions.create(BARS[:5]).session.session_id
    clock.now += 15  # idle: 35 s without use; busy: 15 s
    assert sessions.get(busy).session is not None
    result = sessions.get(idle)
    assert result.error == "not_found" and "expired after more than 30 s idle" in result.message
    assert expirations._value.get() == before + 1
    assert FORECAST_SESSIONS_ACTIVE.labels("unit_test")._value.get() == 1
    clock.now += 29  # every call refreshes the TTL
    assert sessions.step([StepItem(session_id=busy, bar=BARS[5])])[0].error is None


def test_max_sessions_answers_too_many_until_one_is_deleted(model, spec, store):
    sessions = store(model, spec, max_sessions=2)
    first = sessions.create().session.session_id
    sessions.create()
    full = sessions.create(BARS[:5])
    assert full.error == "too_many_sessions"
    assert "2 sessions are open; the limit is 2" in full.message
    assert sessions.delete(first).session.session_id == first
    assert sessions.delete(first).error == "not_found"
    assert sessions.create().error is None


def test_exported_state_resumes_exactly_elsewhere(model, spec, store):
    here, elsewhere = store(model, spec), store(model, spec)
    session_id = here.create(BARS[:30]).session.session_id
    exported = SessionState.model_validate_json(here.export(session_id).state.model_dump_json())
    resumed = elsewhere.import_state(exported).session
    assert resumed.bars_seen == 30 and resumed.next == here.get(session_id).session.next
    a = here.step([StepItem(session_id=session_id, bar=BARS[30])])[0].session.next
    b = elsewhere.step([StepItem(session_id=resumed.session_id, bar=BARS[30])])[0].session.next
    assert a == b


@pytest.mark.parametrize(("changes", "message"), [
    ({"model_version": "ffffffffffffffff"}, "exported from model version ffffffffffffffff"),
    ({"state_shape": [1, 6]}, "does not match the model's [2, 6]"),
    ({"state": [0.0] * 11}, "state has 11 values"),
    ({"state": [float("nan")] * 12}, "NaN or infinite"),
    ({"last_bar": None}, "last_bar must be set"),
    # Finite in float32, but no GRU/LSTM reaches it: h stays in [-1, 1], an LSTM's c within bars_seen.
    ({"state": [1e30] + [0.0] * 11}, "state holds 1e+30; a hidden state (h) of this lstm model"),
    ({"state": [0.0] * 6 + [5.5] + [0.0] * 5}, "state holds 5.5; an LSTM cell after 5 bars"),
    ({"next": None}, "next must be set exactly when bars_seen >= 2"),
])
def test_import_rejects_foreign_or_broken_states(model, spec, changes, message, store):
    sessions = store(model, spec)
    exported = sessions.export(sessions.create(BARS[:5]).session.session_id).state
    result = sessions.import_state(exported.model_copy(update=changes))
    assert result.error == "invalid" and message in result.message


def forged_next(exported: SessionState, **changes) -> dict:
    return {**exported.next.model_dump(mode="json"), **changes}


@pytest.mark.parametrize(("change", "message"), [
    # Issue 13, finding 11: each was accepted, and echoed or stepped to nulls.
    (lambda e: {"state": [1e39, *e.state[1:]]}, "state[0] is 1e+39, not a finite float32"),
    (lambda e: {"bars_seen": 10**300}, "bars_seen"),
    (lambda e: {"bars_seen": 100_000}, "bars_seen 100000 is more than the"),
    (lambda e: {"next": forged_next(e, date="0001-01-01")}, "next must forecast a day after last_bar"),
])
def test_import_schema_refuses_impossible_states(model, spec, change, message):
    """What needs no model is refused by the schema: a 400 at the entry naming the field."""
    sessions = memory_store(model, spec)
    exported = sessions.export(sessions.create(BARS[:5]).session.session_id).state
    with pytest.raises(ValidationError, match=re.escape(message)):
        SessionState.model_validate({**exported.model_dump(mode="json"), **change(exported)})


@pytest.mark.parametrize(("change", "message"), [
    (lambda e, last: {"point": e.next.upper + 10,
                      "quantiles": {**e.next.quantiles, "0.5": e.next.upper + 10}},
     "next.quantiles must not decrease"),
    (lambda e, last: {"date": "2100-01-05"}, "next must be horizon 1 on"),
    (lambda e, last: {"horizon": 3}, "next must be horizon 1 on"),
    (lambda e, last: {"quantiles": {"0.5": e.next.point}}, "next.quantiles must have exactly the levels"),
    (lambda e, last: {"point": e.next.point * 2}, "next.lower/point/upper must be its quantiles"),
    (lambda e, last: {"log_return": 0.5}, "next.log_return must be log(next.point / last_bar.close)"),
    (lambda e, last: {k: -1.0 for k in ("point", "lower", "upper")} | {
        "quantiles": dict.fromkeys(e.next.quantiles, -1.0)}, "must be positive and finite"),
])
def test_import_refuses_a_forged_next(model, spec, change, message, store):
    sessions = store(model, spec)
    exported = sessions.export(sessions.create(BARS[:5]).session.session_id).state
    forged = SessionState.model_validate({**exported.model_dump(mode="json"),
                                          "next": forged_next(exported, **change(exported, BARS[4]))})
    result = sessions.import_state(forged)
    assert result.error == "invalid" and message in result.message, result.message
    assert sessions.import_state(exported).error is None  # the real one still imports


class PoisonedStep:
    """The scripted model, except that ``step`` raises for a whole batch holding the ``poison``
    feature row: a stand-in for any batch-wide failure of the model call."""

    def __init__(self, model) -> None:
        self.model = model
        self.poison = torch.full((len(FEATURES),), float("nan"))  # matches no row

    def initial_state(self, batch_size: int):
        return self.model.initial_state(batch_size)

    def sequence(self, x, state):
        return self.model.sequence(x, state)

    def step(self, x, state):
        if (x == self.poison).all(dim=1).any():
            raise RuntimeError("poisoned batch")
        return self.model.step(x, state)


def snapshot(sessions: SessionStore, session_id: str):
    exported = sessions.export(session_id).state
    return exported.model_dump()


def test_a_step_applies_fully_or_changes_nothing_and_never_fails_its_neighbours(model, spec, store):
    """Every error the step path can raise, each beside valid steps of other sessions in one batch:
    each valid step answers exactly as it would alone and advances once; each bad one answers its
    error and leaves its session exactly as it was."""
    poisoned = PoisonedStep(model)
    sessions = store(poisoned, spec, max_sessions=64)
    alone = store(model, spec, max_sessions=64)

    def bar(base: Bar, **changes) -> Bar:
        return Bar.model_construct(**{**base.model_dump(), **changes})  # past the schema, on purpose

    far = dt.date(9999, 12, 30)  # a Thursday: the next bar, 9999-12-31, has no next business day
    bad_steps = {
        "not_found": lambda sid: StepItem(session_id="missing", bar=BARS[10]),
        "same date": lambda sid: StepItem(session_id=sid, bar=bar(BARS[9], close=BARS[9].close + 1)),
        "earlier date": lambda sid: StepItem(session_id=sid, bar=BARS[4]),
        "non-finite": lambda sid: StepItem(session_id=sid, bar=bar(BARS[10], close=float("inf"),
                                                                   high=float("inf"))),
        "no forecast date": lambda sid: StepItem(session_id=sid,
                                                 bar=bar(BARS[10], date=dt.date(9999, 12, 31))),
        "model failure": lambda sid: StepItem(session_id=sid, bar=bar(BARS[10], volume=4242.0)),
    }
    for kind, make_bad in bad_steps.items():
        history = BARS[:10]
        if kind == "no forecast date":
            history = [*BARS[:9], bar(BARS[9], date=far)]
        bad_id = sessions.create(history).session.session_id
        good_ids = [sessions.create(BARS[i:i + 10]).session.session_id for i in range(5)]
        twin_ids = [alone.create(BARS[i:i + 10]).session.session_id for i in range(5)]
        before = snapshot(sessions, bad_id)
        good = [StepItem(session_id=sid, bar=BARS[i + 10]) for i, sid in enumerate(good_ids)]
        bad = make_bad(bad_id)
        batch = [*good[:2], bad, *good[2:]]
        if kind == "model failure":
            last = history[-1]
            poisoned.poison = torch.tensor(bar_features(last.close, last.volume, bad.bar.open, bad.bar.high,
                                                        bad.bar.low, bad.bar.close, bad.bar.volume))
        results = sessions.step(batch)
        assert results[2].error is not None, kind
        assert "not changed" in results[2].message or kind == "not_found", (kind, results[2].message)
        assert snapshot(sessions, bad_id) == before, kind
        expected = [alone.step([StepItem(session_id=tid, bar=item.bar)])[0]
                    for tid, item in zip(twin_ids, good, strict=True)]
        for got, want in zip([*results[:2], *results[3:]], expected, strict=True):
            assert got.error is None, (kind, got.message)
            assert got.session.bars_seen == want.session.bars_seen == 11
            assert got.session.last_date == want.session.last_date
            assert_same_forecasts([got.session.next], [want.session.next])


def test_a_first_bar_without_a_forecast_date_is_refused_and_changes_nothing(model, spec, store):
    sessions = store(model, spec)
    session_id = sessions.create().session.session_id
    [result] = sessions.step([StepItem(session_id=session_id, bar=Bar.model_construct(
        **{**BARS[0].model_dump(), "date": dt.date(9999, 12, 31)}))])
    assert result.error == "invalid" and "past 9999-12-31" in result.message
    assert sessions.get(session_id).session.bars_seen == 0


@pytest.mark.parametrize("date", ["1799-12-31", "3000-01-01", "9999-12-31"])
def test_bar_dates_outside_the_documented_range_are_refused_by_the_schema(date):
    with pytest.raises(ValidationError, match="date"):
        Bar.model_validate({**EXAMPLE_BARS[-1], "date": date})


class AlwaysLosesBackend(MemoryBackend):
    """Every compare-and-set write loses, as if another worker stepped the session each time."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes = 0

    def write(self, updates):
        self.writes += len(updates)
        return [False] * len(updates)


def test_a_step_that_keeps_losing_the_compare_and_set_is_a_503_session_busy_and_changes_nothing(model, spec):
    backend = AlwaysLosesBackend(10, 60.0, clock=Clock())
    sessions = SessionStore(model, spec, backend, cell="lstm", model_name="unit_test", step_attempts=3)
    session_id = sessions.create(BARS[:10]).session.session_id
    before = snapshot(sessions, session_id)
    [result] = sessions.step([StepItem(session_id=session_id, bar=BARS[10])])
    assert result.error == "busy" and "it was not applied" in result.message
    assert backend.writes == 3  # the bound on attempts holds
    assert snapshot(sessions, session_id) == before
    with pytest.raises(ServiceError) as raised:
        session_answer(result)
    assert (raised.value.status, raised.value.code) == (503, "session_busy")


def columns_of(rows: list[dict]) -> dict:
    """The columnar form of ``rows`` (what ``pandas.DataFrame(rows).to_dict("list")`` gives)."""
    return {name: [row[name] for row in rows] for name in ("date", "open", "high", "low", "close", "volume")}


def test_the_columnar_form_gives_the_same_forecast_as_rows(model, spec):
    body = {"horizon": 3, "quantiles": [0.1, 0.5, 0.9]}
    by_rows = ForecastRequest.model_validate({**body, "rows": EXAMPLE_BARS[-30:]})
    by_columns = ForecastRequest.model_validate({**body, **columns_of(EXAMPLE_BARS[-30:])})
    assert by_columns.bar_count() == by_rows.bar_count() == 30
    assert by_columns.last_bars(WINDOW + 1) == by_rows.last_bars(WINDOW + 1)
    rows_result, columns_result = forecast_windows(model, spec, [by_rows, by_columns])
    assert rows_result.forecasts == columns_result.forecasts


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.pop("volume"), "missing: volume"),
    (lambda c: c["close"].pop(), "one length; got date 30, open 30, high 30, low 30, close 29"),
    (lambda c: c["high"].__setitem__(7, 1.0), r"high\[7\] 1.0 is below low\[7\]"),
    (lambda c: c["date"].__setitem__(9, c["date"][8]), r"date\[9\] .* is duplicated"),
    (lambda c: c["date"].__setitem__(9, "2000-01-03"), r"date\[9\] 2000-01-03 is out of order"),
    (lambda c: c["close"].__setitem__(4, float("nan")), "close.4"),
    (lambda c: c["open"].__setitem__(4, 1e10), "close|open.4"),
    (lambda c: c["date"].__setitem__(29, "9999-12-31"), "date.29"),
    (lambda c: c.update(rows=EXAMPLE_BARS[-30:]), "rows or as the six columns, not both"),
])
def test_bad_columns_are_refused_naming_the_column_and_index(change, message):
    columns = columns_of(EXAMPLE_BARS[-30:])
    change(columns)
    with pytest.raises(ValidationError, match=message):
        ForecastRequest.model_validate(columns)


def test_columns_hold_at_most_the_row_limit():
    from services.schemas.forecast import MAX_ROWS

    rows = [{**EXAMPLE_BARS[0], "date": (dt.date(1900, 1, 1) + dt.timedelta(days=i)).isoformat()}
            for i in range(MAX_ROWS + 1)]
    assert ForecastRequest.model_validate(columns_of(rows[:MAX_ROWS])).bar_count() == MAX_ROWS
    with pytest.raises(ValidationError, match=f"at most {MAX_ROWS} items"):
        ForecastRequest.model_validate(columns_of(rows))


def test_window_features_of_a_batch_equal_row_features_of_each_window_in_both_request_forms():
    import random

    import numpy as np

    from services.forecasting import window_features
    from services.schemas.forecast import COLUMNS

    rng = random.Random(7)
    requests = []
    for _ in range(16):
        close = [rng.uniform(0.5, 900.0) for _ in range(WINDOW + 1)]
        bars = [Bar(date=dt.date(2024, 1, 1) + dt.timedelta(days=i), open=c * rng.uniform(0.9, 1.1),
                    high=c * 1.2, low=c * 0.8, close=c, volume=rng.choice([0.0, rng.uniform(0, 1e9)]))
                for i, c in enumerate(close)]
        requests.append(ForecastRequest(rows=bars))
        columns = {name: [getattr(b, name) for b in bars] for name in COLUMNS}
        requests.append(ForecastRequest(**columns))
    batch = window_features([r.last_columns(WINDOW + 1) for r in requests])
    assert batch.shape == (len(requests), WINDOW, 5) and batch.dtype == np.float32
    for request, features in zip(requests, batch, strict=True):
        expected = np.asarray(row_features(request.last_bars(WINDOW + 1)), dtype=np.float32)
        np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-7)
