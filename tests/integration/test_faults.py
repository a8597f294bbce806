"""Faults on a real ``bentoml serve`` of its own: a tampered artifact, a token, SIGKILL, SIGTERM.

One server for the module, started on a copy of the model store in which the forecast model's
``model.pt`` has one byte flipped (same size, wrong sha256) and with an API token configured. The
tests run in file order; the last one sends SIGTERM and so ends the server. No timing is asserted:
waits are bounded generously and the measured figures are printed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from load.faults import (
    check_degraded,
    damage_store,
    kill_worker_under_load,
    sigterm_in_flight,
    start_degraded,
)
from load.harness import time_to_normal, translate_requests
from services.workers import worker_pid

DAMAGED = "forecast"
TOKEN = "test-token-for-the-fault-server"


@pytest.fixture(scope="module")
def degraded(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("damaged_store")
    damage_store(bentoml_home, home, DAMAGED, "tampered")
    # A long batcher deadline: on this shared machine the batcher would otherwise shed some of the
    # requests put in flight for the SIGTERM test, which is about shutdown, not capacity.
    env = {"RNNSERVE_API_TOKEN": TOKEN, "RNNSERVE_TRANSLATE_DEADLINE_S": "60"}
    server = start_degraded(home, env=env)
    yield server
    server.stop()
    shutil.rmtree(home, ignore_errors=True)


def test_damaged_model_is_not_loaded_and_readyz_names_it(degraded):
    report = check_degraded(degraded, DAMAGED)
    readyz = report["readyz"]
    assert readyz["status"] == 503
    assert readyz["body"]["error"]["code"] == "not_ready"
    assert DAMAGED in readyz["body"]["error"]["message"]
    states = {d["service"]: d["ready"] for d in readyz["body"]["detail"]}
    assert states[DAMAGED] is False
    assert all(ready for name, ready in states.items() if name != DAMAGED)
    assert report["log_line"] is not None and "sha256" in report["log_line"]


def test_damaged_model_answers_503_with_retry_after_and_the_others_serve(degraded):
    report = check_degraded(degraded, DAMAGED)
    probes = report["probes"]
    assert probes[DAMAGED]["status"] == 503
    assert probes[DAMAGED]["retry_after"] is not None
    assert probes[DAMAGED]["code"] == "model_unavailable"
    for name, probe in probes.items():
        if name != DAMAGED:
            assert probe["status"] == 200, (name, probe)


def test_the_api_token_protects_the_session_endpoints(degraded):
    with httpx.Client(base_url=degraded.url, timeout=60) as client:
        missing = client.post("/v1/forecast/sessions", json={})
        wrong = client.post("/v1/forecast/sessions", json={}, headers={"authorization": "Bearer nope"})
        right = client.post("/v1/forecast/sessions", json={}, headers={"authorization": f"Bearer {TOKEN}"})
        other = client.post("/v1/sentiment", json={"text": "fine"})
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 503  # past the token; the forecast model itself is not loaded
    assert other.status_code == 200  # endpoints that change no state need no token


def test_a_worker_killed_with_sigkill_is_restarted_and_nothing_answers_500(degraded):
    pid = degraded.process.pid
    # The translate model service: its in-flight calls break when it dies, and the entry must turn
    # that into 503s, never a 500.
    report = asyncio.run(kill_worker_under_load(degraded.url, pid, "translate", rate=10.0, duration_s=20.0,
                                                kill_at_s=3.0))
    recovered = asyncio.run(time_to_normal(degraded.url, translate_requests(seed=4), limit_s=240))
    print(f"\nSIGKILL: {report['failed_after_kill']} failed requests {report['failed_statuses']}; "
          f"recovery {report['recovery_s']} s in the run; normal answers {recovered} s after it")
    assert recovered is not None, "the service did not answer normally again within 240 s"
    new = worker_pid(pid, "translate")
    assert new != report["old_pid"]
    statuses = report["whole_run"]["statuses"]
    assert "500" not in statuses and "ClientTimeout" not in statuses, statuses
    # Every answer is a 200 or a 503 with Retry-After. A request whose connection breaks as the worker
    # dies can instead surface as a client-side connection error (aiohttp's ServerDisconnectedError or
    # ClientOSError, each seen once in 200 requests in a CI run); it must stay rare, and nothing may
    # answer 500 or hang.
    connection_errors = {"ServerDisconnectedError", "ClientOSError"}
    assert set(statuses) - {"200", "503"} <= connection_errors, statuses
    assert sum(statuses.get(name, 0) for name in connection_errors) <= 2, statuses
    assert report["whole_run"]["retryable_without_retry_after"] == 0


def test_sigterm_finishes_every_request_in_flight(degraded):
    # The restarted translate worker must be serving before the requests are put in flight.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        probe = httpx.post(f"{degraded.url}/v1/translate", json={"text": "I like cats."}, timeout=60)
        if probe.status_code == 200:
            break
        time.sleep(1)
    report = asyncio.run(sigterm_in_flight(degraded.url, degraded.process.pid, requests=16))
    print(f"\nSIGTERM: {report}")
    assert report["answered_before_sigterm"] < report["in_flight"], "nothing was in flight: " + str(report)
    assert report["statuses"] == {"200": report["in_flight"]}, report
    assert report["all_ok"]
    assert report["late_request"] != "200"
    assert report["exited_after_s"] is not None
    assert degraded.process.wait(timeout=60) is not None
    assert not os.path.exists(f"/proc/{degraded.process.pid}")
