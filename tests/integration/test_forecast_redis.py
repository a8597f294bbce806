"""Forecast sessions in a real Redis, through real ``bentoml serve`` processes.

Two standalone forecast services (``bentoml serve services.forecast:Forecast``; the first with two
workers) share one ``redis-server`` (AOF, appendfsync always), so that any process steps any session:
a restarted service continues its sessions, alternate steps on two services equal one sequential run,
concurrent steps of one session apply once each in date order, and a killed and restarted Redis keeps
every acknowledged step. The composed server (``services.api:Api``) on a Redis of its own shows the
public side: the limit and TTL, and 503 ``session_store_unavailable`` with Retry-After on session
routes only while Redis is down. Skipped, saying why, only when redis-server cannot be started.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from services.schemas.forecast import EXAMPLE_BARS, FORECAST_EXAMPLE
from tests import redis_fixtures
from tests.conftest import Server
from tests.redis_fixtures import start_or_skip

redis_server = redis_fixtures.redis_server  # the fixture, by its name in this module
FORECAST = "services.forecast:Forecast"
SESSIONS = "/v1/forecast/sessions"


class Sessions:
    """The forecast service's own session API (what the entry forwards to)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=60)

    def create(self, history: list[dict]) -> dict:
        response = self.http.post("/create_session", json={"history": history})
        assert response.status_code == 200, response.text
        return response.json()

    def step(self, session_id: str, bar: dict) -> dict:
        for _ in range(50):  # BentoML's batcher may shed load on a busy machine: nothing ran, retry
            response = self.http.post("/step", json={"items": [{"session_id": session_id, "bar": bar}]})
            if response.status_code != 503:
                break
            time.sleep(0.1)
        assert response.status_code == 200, response.text
        return response.json()[0]

    def export(self, session_id: str) -> dict:
        return self.http.post("/export_session", json={"session_id": session_id}).json()


def serve(bentoml_home, url: str, **env: str) -> Server:
    return Server(bentoml_home, target=FORECAST, env={"RNNSERVE_FORECAST_SESSION_STORE": url,
                                                      **{f"RNNSERVE_FORECAST_{k.upper()}": v
                                                         for k, v in env.items()}}).start()


@pytest.fixture(scope="module")
def pair(bentoml_home, redis_server) -> Iterator[list[Sessions]]:
    """Two forecast services on one Redis: the first with two workers."""
    services = [Sessions(serve(bentoml_home, redis_server.url, workers="2")),
                Sessions(serve(bentoml_home, redis_server.url))]
    try:
        yield services
    finally:
        for service in services:
            service.server.stop()


def reference(service: Sessions, history: list[dict], bars: list[dict]) -> list[dict]:
    """One uninterrupted session on one service: the answers every other run must equal."""
    session_id = service.create(history)["session"]["session_id"]
    return [service.step(session_id, bar)["session"] for bar in bars]


def forecasts(answers: list[dict]) -> list[tuple]:
    return [(a["bars_seen"], a["last_date"], a["next"]) for a in answers]


def test_two_services_on_one_redis_take_alternate_steps_and_equal_one_sequential_run(pair):
    history, bars = EXAMPLE_BARS[:30], EXAMPLE_BARS[30:50]
    session_id = pair[0].create(history)["session"]["session_id"]
    alternate = [pair[i % 2].step(session_id, bar)["session"] for i, bar in enumerate(bars)]
    assert forecasts(alternate) == forecasts(reference(pair[0], history, bars))


def test_a_restarted_service_continues_its_sessions_with_identical_forecasts(bentoml_home, redis_server,
                                                                              pair):
    history, bars = EXAMPLE_BARS[:30], EXAMPLE_BARS[30:60]
    session_id = pair[1].create(history)["session"]["session_id"]
    before = [pair[1].step(session_id, bar)["session"] for bar in bars[:15]]
    pair[1].server.stop()  # a rollout: SIGTERM, the process and its memory are gone
    pair[1] = restarted = Sessions(serve(bentoml_home, redis_server.url))
    after = [restarted.step(session_id, bar)["session"] for bar in bars[15:]]
    assert forecasts(before + after) == forecasts(reference(restarted, history, bars))


def test_32_concurrent_steps_of_one_session_apply_each_accepted_bar_once_in_date_order(pair):
    """32 bars of one session posted at once in random order to three processes (two services, one
    with two workers): each is applied (200) or refused as stale (409), never both applied to one
    state; the applied ones advance bars_seen one by one in date order, and the session ends where
    one sequential run over exactly the accepted bars ends."""
    history, bars = EXAMPLE_BARS[:30], EXAMPLE_BARS[30:62]
    session_id = pair[0].create(history)["session"]["session_id"]
    order = list(range(32))
    random.Random(18).shuffle(order)
    start = threading.Barrier(32)

    def post(k: int) -> dict:
        with httpx.Client(base_url=pair[k % 2].server.url, timeout=60) as http:
            start.wait()
            body = {"items": [{"session_id": session_id, "bar": bars[order[k]]}]}
            for _ in range(50):
                response = http.post("/step", json=body)
                if response.status_code != 503:
                    return response.json()[0]
                time.sleep(0.1)
            raise AssertionError(response.text)

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(post, range(32)))
    applied = sorted((a["session"]["last_date"], a["session"]["bars_seen"]) for a in answers
                     if a["error"] is None)
    refused = [a for a in answers if a["error"] is not None]
    print(f"\n32 concurrent steps of one session: attempted 32, applied {len(applied)}, "
          f"refused {len(refused)} ({sorted({a['error'] for a in refused})})")
    assert {a["error"] for a in refused} <= {"stale"}, refused
    assert [seen for _, seen in applied] == list(range(31, 31 + len(applied)))
    accepted = [bar for bar in bars if bar["date"] in {date for date, _ in applied}]
    final = pair[1].export(session_id)["state"]
    expected = reference(pair[1], history, accepted)[-1]
    assert (final["bars_seen"], final["last_bar"]["date"], final["next"]) == (
        expected["bars_seen"], expected["last_date"], expected["next"])


def test_a_killed_and_restarted_redis_loses_no_acknowledged_step(pair, redis_server):
    history, bars = EXAMPLE_BARS[:30], EXAMPLE_BARS[30:50]
    session_id = pair[0].create(history)["session"]["session_id"]
    acknowledged = [pair[0].step(session_id, bar)["session"] for bar in bars[:10]]
    redis_server.kill()  # SIGKILL: no shutdown, no last save
    down = pair[1].step(session_id, bars[10])
    assert down["error"] == "unavailable" and "did not answer" in down["message"]
    redis_server.start()  # same port, same AOF
    assert pair[1].export(session_id)["session"]["bars_seen"] == 30 + len(acknowledged)
    rest = [pair[i % 2].step(session_id, bar)["session"] for i, bar in enumerate(bars[10:])]
    assert forecasts(acknowledged + rest) == forecasts(reference(pair[0], history, bars))


# The public side: the composed server on a Redis of its own ---------------------------------------

MAX_SESSIONS, TTL_S = 2, 2


@pytest.fixture(scope="module")
def composed(bentoml_home, tmp_path_factory) -> Iterator[tuple[httpx.Client, object]]:
    redis = start_or_skip(tmp_path_factory.mktemp("redis-composed"))
    server = Server(bentoml_home, env={"RNNSERVE_FORECAST_SESSION_STORE": redis.url,
                                       "RNNSERVE_FORECAST_MAX_SESSIONS": str(MAX_SESSIONS),
                                       "RNNSERVE_FORECAST_SESSION_TTL_S": str(TTL_S)}).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            yield http, redis
    finally:
        server.stop()
        redis.stop()


def test_the_limit_and_ttl_hold_with_redis(composed):
    http, _ = composed
    first = http.post(SESSIONS, json={}).json()["session_id"]
    http.post(SESSIONS, json={"history": EXAMPLE_BARS[:3]})
    full = http.post(SESSIONS, json={})
    assert full.status_code == 429 and f"the limit is {MAX_SESSIONS}" in full.text, full.text
    time.sleep(TTL_S + 0.5)  # idle past the TTL: Redis expires the keys itself
    gone = http.post(f"{SESSIONS}/get", json={"session_id": first})
    assert gone.status_code == 404 and "expired" in gone.text
    assert http.post(SESSIONS, json={}).status_code == 200


def test_redis_down_is_a_503_on_session_routes_only(composed):
    http, redis = composed
    session_id = http.post(SESSIONS, json={"history": EXAMPLE_BARS[:30]}).json()["session_id"]
    stale = http.post(f"{SESSIONS}/step", json={"session_id": session_id, "bar": EXAMPLE_BARS[3]})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_bar", stale.text
    redis.kill()
    try:
        for route, body in (("/step", {"session_id": session_id, "bar": EXAMPLE_BARS[30]}),
                            ("", {}), ("/get", {"session_id": session_id})):
            response = http.post(f"{SESSIONS}{route}", json=body)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "session_store_unavailable"
            assert response.headers["retry-after"] == "1"
        assert http.post("/v1/forecast", json=FORECAST_EXAMPLE).status_code == 200
        assert http.post("/v1/sentiment", json={"text": "a fine film"}).status_code == 200
        assert http.get("/readyz").status_code == 200  # a shared dependency takes no one out of rotation
    finally:
        redis.start()
    resumed = http.post(f"{SESSIONS}/step", json={"session_id": session_id, "bar": EXAMPLE_BARS[30]})
    assert resumed.status_code == 200 and resumed.json()["bars_seen"] == 31, resumed.text
