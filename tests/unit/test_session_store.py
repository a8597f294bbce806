"""The session stores under concurrency and failure: compare-and-set, round trips, Redis down, TTL and
the shared limit, on a real ``redis-server`` (tests/redis_fixtures.py) and in memory."""

from __future__ import annotations

import dataclasses
import random
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from services.errors import ServiceError, encode
from services.forecast import StoreHealth, session_answer
from services.local_redis import RedisServer
from services.redis_sessions import RedisBackend
from services.schemas.forecast import StepItem
from services.session_store import MemoryBackend
from services.sessions import SessionStore
from services.settings import Settings
from tests import redis_fixtures
from tests.redis_fixtures import start_or_skip
from tests.unit import test_forecast_service
from tests.unit.test_forecast_service import BARS, memory_store

# Fixtures shared with those modules (a fixture is found by its name in the test's module).
redis_server = redis_fixtures.redis_server
model, spec = test_forecast_service.model, test_forecast_service.spec


def redis_backend(url: str, spec, prefix: str | None = None, max_sessions: int = 64, ttl_s: float = 60.0,
                  timeout_s: float = 5.0) -> RedisBackend:
    return RedisBackend(url, max_sessions, ttl_s, spec.state_shape, timeout_s=timeout_s,
                        prefix=prefix or f"unit:{secrets.token_hex(8)}:")


def worker(model, spec, backend) -> SessionStore:
    """A store as one forecast worker holds it; two on one Redis are two workers (or replicas)."""
    return SessionStore(model, spec, backend, cell="lstm", model_name="unit_test")


def test_a_write_applies_only_on_the_version_it_read(model, spec, redis_server):
    for backend in (MemoryBackend(8, 60.0), redis_backend(redis_server.url, spec)):
        store = worker(model, spec, backend)
        session_id = store.create(BARS[:5]).session.session_id
        [record] = backend.read([session_id])
        newer = dataclasses.replace(record, version=record.version + 1, bars_seen=99)
        assert backend.write([(session_id, record.version, newer)]) == [True]
        assert backend.write([(session_id, record.version, newer)]) == [False]  # a lost race
        assert backend.write([("missing", 1, newer)]) == [False]
        assert backend.read([session_id])[0].bars_seen == 99


@pytest.mark.parametrize("kind", ["memory", "redis: two workers"])
def test_32_concurrent_steps_of_one_session_apply_each_accepted_bar_once_in_date_order(
        model, spec, kind, request):
    """32 bars of one session posted at once, in random order, from 32 threads (with Redis: through
    two stores on one Redis, as two workers). Each answer is 200 (applied) or 409 stale; the applied
    bars_seen follow the dates one by one, and the final state equals stepping exactly the accepted
    bars in order."""
    if kind == "memory":
        stores = [memory_store(model, spec, max_sessions=64)]
    else:
        url = request.getfixturevalue("redis_server").url
        prefix = f"unit:{secrets.token_hex(8)}:"
        stores = [worker(model, spec, redis_backend(url, spec, prefix)) for _ in range(2)]
    session_id = stores[0].create(BARS[:10]).session.session_id
    bars = BARS[10:42]
    order = list(range(32))
    random.Random(7).shuffle(order)
    start = threading.Barrier(32)

    def post(k: int):
        start.wait()
        return stores[k % len(stores)].step([StepItem(session_id=session_id, bar=bars[order[k]])])[0]

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(post, range(32)))
    applied = sorted((bars[order[k]].date, r.session.bars_seen) for k, r in enumerate(results)
                     if r.error is None)
    refused = [r for r in results if r.error is not None]
    print(f"{kind}: attempted 32, applied {len(applied)}, refused {len(refused)}")
    assert {r.error for r in refused} <= {"stale"}, [r.message for r in refused]
    assert [seen for _, seen in applied] == list(range(11, 11 + len(applied)))  # once each, in date order
    final = stores[0].export(session_id).state
    assert final.bars_seen == 10 + len(applied)
    replay = memory_store(model, spec)
    twin = replay.create(BARS[:10]).session.session_id
    accepted = [b for b in bars if b.date in {date for date, _ in applied}]
    for bar in accepted:
        replay.step([StepItem(session_id=twin, bar=bar)])
    expected = replay.export(twin).state
    assert final.last_bar == expected.last_bar and final.next == expected.next
    torch.testing.assert_close(torch.tensor(final.state), torch.tensor(expected.state))


def test_a_batch_of_many_sessions_is_one_read_and_one_write_round_trip(model, spec, redis_server):
    backend = redis_backend(redis_server.url, spec)
    store = worker(model, spec, backend)
    ids = [store.create(BARS[i:i + 10]).session.session_id for i in range(16)]
    pool = backend.client.connection_pool
    calls = {"n": 0}
    get_connection = pool.get_connection

    def counting(*args, **kwargs):
        calls["n"] += 1
        return get_connection(*args, **kwargs)

    pool.get_connection = counting
    try:
        results = store.step([StepItem(session_id=s, bar=BARS[i + 10]) for i, s in enumerate(ids)])
    finally:
        pool.get_connection = get_connection
    assert all(r.error is None for r in results)
    assert calls["n"] == 2, f"{calls['n']} Redis round trips for a batch of 16 sessions"


def test_redis_down_is_a_503_with_retry_after_and_changes_nothing(model, spec, tmp_path):
    server = start_or_skip(tmp_path / "redis")
    try:
        backend = redis_backend(server.url, spec, timeout_s=0.5)
        store = worker(model, spec, backend)
        session_id = store.create(BARS[:10]).session.session_id
        assert store.step([StepItem(session_id=session_id, bar=BARS[10])])[0].error is None
        health = StoreHealth(min_interval_s=0)
        health.backend = backend
        assert health.check()["ready"] is True
        server.kill()
        for result in (store.step([StepItem(session_id=session_id, bar=BARS[11])])[0], store.create(),
                       store.get(session_id), store.export(session_id), store.delete(session_id)):
            assert result.error == "unavailable", result
            with pytest.raises(ServiceError) as raised:
                session_answer(result)
            assert (raised.value.status, raised.value.code) == (503, "session_store_unavailable")
            assert "redis 127.0.0.1" in raised.value.message
            _, headers = encode(raised.value)
            assert (b"retry-after", b"1") in headers
        entry = health.check()
        assert entry["ready"] is False and entry["name"] == "session_store" and entry["error"]
        server.start()  # the same port and AOF: the acknowledged step is there, the refused one is not
        info = store.get(session_id).session
        assert (info.bars_seen, info.last_date) == (11, BARS[10].date)
        assert store.step([StepItem(session_id=session_id, bar=BARS[11])])[0].session.bars_seen == 12
        assert health.check()["ready"] is True
    finally:
        server.stop()


def test_redis_ttl_expires_idle_sessions_and_the_limit_holds_across_workers(model, spec, redis_server):
    prefix = f"unit:{secrets.token_hex(8)}:"
    first, second = (worker(model, spec, redis_backend(redis_server.url, spec, prefix, max_sessions=2,
                                                       ttl_s=1.0)) for _ in range(2))
    a = first.create().session.session_id
    second.create(BARS[:3])
    full = second.create()  # the limit counts both workers' sessions
    assert full.error == "too_many_sessions" and "2 sessions are open; the limit is 2" in full.message
    assert first.backend.client.pttl(first.backend.key(a)) > 0  # Redis's own expiry
    time.sleep(1.2)  # idle past the TTL (get would restart the idle clock)
    assert first.get(a).error == "not_found"
    assert second.create().error is None  # expired ones no longer count


def test_a_state_stored_by_another_model_version_is_refused(model, spec, redis_server):
    backend = redis_backend(redis_server.url, spec)
    store = worker(model, spec, backend)
    session_id = store.create(BARS[:5]).session.session_id
    [record] = backend.read([session_id])
    backend.write([(session_id, record.version, dataclasses.replace(record, version=record.version + 1,
                                                                    model_version="ffffffffffffffff"))])
    backend.client.hset(backend.key(session_id), "m", "ffffffffffffffff")
    for result in (store.get(session_id), store.step([StepItem(session_id=session_id, bar=BARS[5])])[0]):
        assert result.error == "model_version" and "model version ffffffffffffffff" in result.message
        with pytest.raises(ServiceError) as raised:
            session_answer(result)
        assert (raised.value.status, raised.value.code) == (409, "session_model_mismatch")


@pytest.mark.parametrize(("env", "message"), [
    ({"RNNSERVE_FORECAST_WORKERS": "3"}, "RNNSERVE_FORECAST_SESSION_STORE is memory"),
    ({"RNNSERVE_FORECAST_SESSION_STORE": "mysql://db"}, "RNNSERVE_FORECAST_SESSION_STORE"),
    ({"RNNSERVE_FORECAST_SESSION_STORE_TIMEOUT_S": "0"}, "RNNSERVE_FORECAST_SESSION_STORE_TIMEOUT_S"),
    ({"RNNSERVE_FORECAST_SESSION_STEP_ATTEMPTS": "0"}, "RNNSERVE_FORECAST_SESSION_STEP_ATTEMPTS"),
])
def test_session_store_settings_are_checked(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env, secrets_dir="/nonexistent")


def test_more_workers_need_a_redis_store():
    settings = Settings.from_env({"RNNSERVE_FORECAST_WORKERS": "4",
                                  "RNNSERVE_FORECAST_SESSION_STORE": "redis://redis:6379/0"},
                                 secrets_dir="/nonexistent")
    assert settings.forecast.workers == 4 and settings.forecast.session_store.startswith("redis://")
    assert Settings.from_env({}, secrets_dir="/nonexistent").forecast.session_store == "memory"


def test_the_local_redis_helper_reports_a_missing_binary(monkeypatch, tmp_path):
    monkeypatch.setattr(RedisServer, "available", staticmethod(lambda: None))
    with pytest.raises(RuntimeError, match="apt-get install redis-server"):
        RedisServer(tmp_path).start()
