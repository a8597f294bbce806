"""The pure parts of ``load/locust_bench.py``: Locust's CSV into the table, CPU per request, URL bounds."""

from pathlib import Path

import pytest
import torch

from load.locust_bench import (
    Step,
    cpu_per_request_ms,
    locust_command,
    read_failures,
    read_stats,
    request_bodies,
    route_of,
    split_url,
    table,
)

STATS_HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
                "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
                "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%")


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_stats_takes_the_aggregated_row(tmp_path):
    path = write(tmp_path / "s_stats.csv", STATS_HEADER,
                 "POST,/v1/sentiment,1200,30,14,15.2,1.5,300.1,358.4,60.5,1.5,14,16,18,19,25,33,60,88,200,300,300",
                 ",Aggregated,1250,31,15,15.9,1.5,310.0,358.4,62.75,1.55,15,17,19,20,26,34,61,90,210,310,310")
    assert read_stats(path) == {"requests": 1250, "failure_count": 31, "rps": 62.75, "p50_ms": 15.0,
                                "p99_ms": 90.0}


def test_read_stats_without_samples_and_without_aggregated_row(tmp_path):
    empty = write(tmp_path / "e_stats.csv", STATS_HEADER,
                  ",Aggregated,0,0,0,0,0,0,0,0,0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A")
    assert read_stats(empty) == {"requests": 0, "failure_count": 0, "rps": 0.0, "p50_ms": None,
                                 "p99_ms": None}
    with pytest.raises(ValueError, match="no Aggregated row"):
        read_stats(write(tmp_path / "x_stats.csv", STATS_HEADER))


def test_read_failures_counts_by_status_across_names(tmp_path):
    path = write(tmp_path / "f_failures.csv", "Method,Name,Error,Occurrences,First Seen,Last Seen",
                 "POST,/v1/sentiment,CatchResponseError('status 503'),12,1,2",
                 "POST,/other,CatchResponseError('status 503'),3,1,2",
                 "POST,/v1/sentiment,CatchResponseError('status 429'),1,1,2",
                 "POST,/v1/sentiment,CatchResponseError('no answer: ConnectionRefusedError'),2,1,2")
    assert read_failures(path) == {"429": 1, "503": 15,
                                   "CatchResponseError('no answer: ConnectionRefusedError')": 2}
    assert read_failures(tmp_path / "missing.csv") == {}


def test_cpu_per_request_arithmetic():
    assert cpu_per_request_ms(2.5, 1000) == pytest.approx(2.5)
    assert cpu_per_request_ms(30.0, 12_000) == pytest.approx(2.5)
    assert cpu_per_request_ms(None, 1000) is None  # a peer without --server-pid
    assert cpu_per_request_ms(1.0, 0) is None


def step(**overrides) -> Step:
    values = {"users": 64, "requests": 12_000, "failures": {"503": 20}, "rps": 800.0, "p50_ms": 70.0,
              "p99_ms": 210.0, "seconds": 16.5, "server_cpu_s": 24.0, "client_cpu_s": 9.0}
    return Step(**{**values, **overrides})


def test_step_figures():
    s = step()
    assert s.ok == 11_980
    assert s.ok_rps == pytest.approx(800.0 * 11_980 / 12_000)  # a 503 is not served
    assert s.server_cpu_ms_per_request == pytest.approx(2.0)
    assert s.client_cpu_ms_per_request == pytest.approx(0.75)
    assert s.server_cores == pytest.approx(24.0 / 15.0)  # over Locust's span: 12,000 / 800 = 15 s
    unknown = step(server_cpu_s=None)
    assert unknown.server_cpu_ms_per_request is None and unknown.server_cores is None


def test_table_rows_from_steps():
    text = table([step(users=1, requests=1500, failures={}, rps=100.4, p50_ms=9.0, p99_ms=20.0,
                       server_cpu_s=3.0, client_cpu_s=1.5, requests_per_call=1.0, model_busy=0.25),
                  step(server_cpu_s=None)])
    header, rule, first, second = text.splitlines()
    assert header.count("|") == rule.count("|") == first.count("|") == second.count("|")
    assert first == "| 1 | 100 | 9 | 20 | 1500 | 0 | 2.00 | 0.20 | 1.00 | 1.0 | 25% |"
    assert second == "| 64 | 799 | 70 | 210 | 12000 | 20 x 503 | unknown | unknown | 0.75 |  |  |"


def test_split_url_only_loopback_http():
    assert split_url("http://127.0.0.1:3000", "sentiment") == ("http://127.0.0.1:3000", "/v1/sentiment")
    assert split_url("http://127.0.0.1:3000/", "forecast") == ("http://127.0.0.1:3000", "/v1/forecast")
    assert split_url("http://127.0.0.1:8080/predictions/sentiment", "sentiment") == (
        "http://127.0.0.1:8080", "/predictions/sentiment")
    for url in ("http://example.com:80", "https://127.0.0.1:3000", "http://127.0.0.1", "http://10.0.0.1:3000"):
        with pytest.raises(ValueError, match=r"only loads http://127\.0\.0\.1"):
            split_url(url, "sentiment")


def test_bodies_and_routes():
    from services.schemas.forecast import FORECAST_EXAMPLE

    bodies = request_bodies("sentiment")
    assert len(bodies) == 872 and all(set(b) == {"text"} and b["text"] for b in bodies)
    assert request_bodies("forecast") == [FORECAST_EXAMPLE]
    assert route_of("forecast") == route_of("forecast-columns") == "/v1/forecast"
    from services.schemas.forecast import ForecastRequest

    rows, [columns] = ForecastRequest.model_validate(FORECAST_EXAMPLE), request_bodies("forecast-columns")
    assert "rows" not in columns and len(columns["close"]) == len(FORECAST_EXAMPLE["rows"])
    as_columns = ForecastRequest.model_validate(columns)
    assert as_columns.bars_field == "date" and as_columns.last_bars(61) == rows.last_bars(61)
    for bad in (lambda: route_of("caption"), lambda: request_bodies("caption")):
        with pytest.raises(ValueError, match="sentiment, forecast"):
            bad()


def test_locust_command_is_headless_and_bounded(tmp_path):
    command = locust_command("http://127.0.0.1:3000", 256, 15, tmp_path / "p")
    assert command[command.index("--run-time") + 1] == "15s"
    assert command[command.index("--users") + 1] == command[command.index("--spawn-rate") + 1] == "256"
    assert "--headless" in command and command[command.index("--host") + 1] == "http://127.0.0.1:3000"
    assert command[command.index("-f") + 1].endswith("load/locust_bench_users.py")


def test_torchserve_handler_answers_as_the_project_does():
    # load/torchserve/handler.py on the committed artifact: the same label and score as the
    # project's classify, in request order, for bodies as TorchServe passes them (bytes or parsed).
    from types import SimpleNamespace

    from load.harness import sentences
    from load.torchserve import handler
    from models.artifact import load_artifact
    from models.text import Vocab
    from services.sentiment import classify, encode
    from tests.conftest import ARTIFACTS

    context = SimpleNamespace(system_properties={"model_dir": str(ARTIFACTS / "sentiment")})
    texts = sentences()[:9]
    rows = [{"body": {"text": t}} if i % 2 else {"body": f'{{"text": "{t}"}}'.encode()}
            for i, t in enumerate(texts)] + [{"body": {"text": "   "}}]
    threads = torch.get_num_threads()
    try:
        answers = handler.handle(rows, context)  # sets one intra-op thread, as TorchServe's worker runs
    finally:
        torch.set_num_threads(threads)
    model, metadata = load_artifact(ARTIFACTS / "sentiment")
    expected = classify(model, list(metadata["labels"]),
                        encode(Vocab(metadata["vocab"]), texts, int(metadata["max_tokens"])))
    assert len(answers) == len(rows)
    for answer, result in zip(answers, expected, strict=False):
        assert answer["label"] == result.label and answer["score"] == pytest.approx(result.score, abs=1e-6)
    assert "error" in answers[-1]
    assert handler.handle(None, context) is None
