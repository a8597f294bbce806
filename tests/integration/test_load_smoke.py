"""A short, bounded, headless Locust run against the real server: every endpoint answers, zero failures.

Speed is not asserted (that is ``make bench``); this proves the Locust users, their payloads and
response checks, and the server agree, in about 20 seconds.
"""

import csv
import os
import subprocess

from load.report import server_view
from load.run import locust_command, read_metrics
from services.local_server import ROOT, parse_metrics
from tests.conftest import ARTIFACTS

RUN_TIME_S = 20


def test_locust_smoke_run_has_no_failures(server, tmp_path):
    # Locust is imported only in its own process (gevent patches ssl and sockets at import).
    with_users = [path.stem.removesuffix("_locust") for path in sorted((ROOT / "load").glob("*_locust.py"))]
    served = [name for name in with_users if (ARTIFACTS / name / "model.pt").is_file()]
    assert "sentiment" in served
    before = parse_metrics(read_metrics(server.url))
    users = 4 * len(served)
    command = locust_command(server.url, tmp_path, users=users, spawn_rate=users, run_time=f"{RUN_TIME_S}s")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIME_S + 120,
                          env={**os.environ, "LOAD_MODELS": ",".join(served)})
    after = parse_metrics(read_metrics(server.url))
    with open(tmp_path / "locust_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    failures = (tmp_path / "locust_failures.csv").read_text()
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{failures}"
    assert int(rows["Aggregated"]["Failure Count"]) == 0, failures
    assert int(rows["Aggregated"]["Request Count"]) > 0
    # Every served model's users reached their endpoints, and the server saw the traffic.
    routes = {name.split(" ", 1)[0] for name in rows if name != "Aggregated"}
    for model in served:
        assert any(route.startswith(f"/v1/{model}") for route in routes), (model, sorted(routes))
    view = server_view(before, after)
    assert view.requests["/v1/sentiment"].get("200", 0) > 0
    assert not any(code.startswith("5") for codes in view.requests.values() for code in codes)
