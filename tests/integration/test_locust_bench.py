"""``python -m load.locust_bench`` against the real server: 1 user for 3 s, its CPU read from its pid.

Speed is not asserted (that is the benchmark's printout); this proves that Locust runs bounded, that
its CSV, the failures by status and the server's CPU per request come back, in about 15 seconds.
"""

import pytest

from load.locust_bench import main

SECONDS = "3"


@pytest.mark.parametrize("endpoint", ["sentiment", "forecast"])
def test_one_user_against_the_server(server, tmp_path, endpoint):
    report = main(["--endpoint", endpoint, "--users", "1", "--seconds", SECONDS, "--ceiling-seconds", "0",
                   "--url", server.url, "--server-pid", str(server.process.pid), "--out", str(tmp_path)])
    (step,) = report["steps"]
    assert step["users"] == 1 and step["requests"] > 0 and step["failures"] == {}
    assert step["rps"] > 0 and step["p50_ms"] is not None and step["p99_ms"] >= step["p50_ms"]
    assert step["server_cpu_s"] > 0 and step["server_cpu_ms_per_request"] > 0
    assert step["client_cpu_s"] > 0
    assert step["requests_per_call"] >= 1  # read from this project's /metrics
    assert (tmp_path / f"locust_bench_{endpoint}.json").is_file()


def test_failures_by_status_and_unknown_cpu(server, tmp_path):
    # Every request to an unknown path answers 404: each is counted as a failure under its status.
    report = main(["--endpoint", "sentiment", "--users", "1", "--seconds", SECONDS, "--ceiling-seconds", "0",
                   "--url", f"{server.url}/v1/no-such-route", "--out", str(tmp_path)])
    (step,) = report["steps"]
    assert step["requests"] > 0 and step["failures"] == {"404": step["requests"]}
    assert step["server_cpu_s"] is None and step["server_cpu_ms_per_request"] is None
