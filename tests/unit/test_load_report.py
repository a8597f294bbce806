"""load/report.py: Locust CSVs and /metrics read, failures by status, and disagreement detection."""

from pathlib import Path

from load.report import (
    by_user_count,
    disagreements,
    knee_markdown,
    read_locust,
    route_of,
    server_view,
    status_of,
    summary_markdown,
)
from services.local_server import parse_metrics

HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
          "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,"
          "80%,90%,95%,98%,99%,99.9%,99.99%,100%\n")


def metrics(sentiment_200: int, sentiment_503: int, batches: dict[str, int], padding: int) -> str:
    entry = 'service_name="rnnserve",runner_name="rnnserve",service_version="x"'
    lines = [
        "# TYPE bentoml_service_request_total counter",
        f'bentoml_service_request_total{{endpoint="/v1/sentiment",http_response_code="200",{entry}}} '
        f"{sentiment_200}",
        f'bentoml_service_request_total{{endpoint="/v1/sentiment",http_response_code="503",{entry}}} '
        f"{sentiment_503}",
        "# TYPE bentoml_service_adaptive_batch_size histogram",
    ]
    labels = 'method_name="classify",runner_name="sentiment",service_name="sentiment",worker_index="1"'
    total = count_sum = 0
    for bound in ("1.0", "2.0", "4.0", "+Inf"):
        total += batches.get(bound, 0)
        count_sum += batches.get(bound, 0) * (float(bound) if bound != "+Inf" else 8)
        lines.append(f'bentoml_service_adaptive_batch_size_bucket{{le="{bound}",{labels}}} {total}')
    lines += [f"bentoml_service_adaptive_batch_size_count{{{labels}}} {total}",
              f"bentoml_service_adaptive_batch_size_sum{{{labels}}} {count_sum}",
              "# TYPE rnnserve_model_padding_tokens_total counter",
              f'rnnserve_model_padding_tokens_total{{model="sentiment"}} {padding}',
              "# TYPE rnnserve_model_input_length_tokens histogram",
              'rnnserve_model_input_length_tokens_bucket{le="+Inf",model="sentiment"} 10',
              'rnnserve_model_input_length_tokens_count{model="sentiment"} 10',
              f'rnnserve_model_input_length_tokens_sum{{model="sentiment"}} {3 * padding}',
              "# TYPE rnnserve_model_batch_padding_ratio histogram",
              'rnnserve_model_batch_padding_ratio_bucket{le="+Inf",model="sentiment"} 4',
              'rnnserve_model_batch_padding_ratio_count{model="sentiment"} 4',
              'rnnserve_model_batch_padding_ratio_sum{model="sentiment"} 1.0']
    return "\n".join(lines) + "\n"


def write_locust(folder: Path, requests: int, failures: int) -> Path:
    prefix = folder / "locust"
    row = "POST,/v1/sentiment [1],{n},{f},10,12,1,90,100,50.0,0.5,10,11,12,13,20,30,40,50,60,70,90\n"
    aggregated = ",Aggregated,{n},{f},10,12,1,90,100,50.0,0.5,10,11,12,13,20,30,40,50,60,70,90\n"
    Path(f"{prefix}_stats.csv").write_text(HEADER + row.format(n=requests, f=failures)
                                           + aggregated.format(n=requests, f=failures))
    Path(f"{prefix}_failures.csv").write_text(
        "Method,Name,Error,Occurrences\n"
        f'POST,/v1/sentiment [1],"status 503: {{""error"": ...}}",{failures}\n')
    return prefix


def test_names_and_statuses():
    assert route_of("/v1/sentiment [2-16]") == "/v1/sentiment"
    assert status_of("status 503: overloaded") == "503"
    assert status_of("HTTPError('429 Client Error')") == "429"
    assert status_of("ConnectionRefusedError(111, 'refused')") == "ConnectionRefusedError"


def test_server_view_is_the_difference_of_two_scrapes():
    before = parse_metrics(metrics(10, 0, {"1.0": 5}, padding=100))
    after = parse_metrics(metrics(110, 3, {"1.0": 5, "2.0": 20, "4.0": 10}, padding=400))
    view = server_view(before, after)
    assert view.requests == {"/v1/sentiment": {"200": 100, "503": 3}}
    assert view.batch_sizes == {"sentiment.classify": {1.0: 0, 2.0: 20, 4.0: 10, float("inf"): 0}}
    assert view.batch_means["sentiment.classify"] == (20 * 2 + 10 * 4) / 30
    assert view.padding_waste == {"sentiment": (300, 900)}


def test_batch_sizes_of_several_workers_add_up():
    """Two entry workers each batch the sentiment model (services/inprocess.py): the mean over both
    must use both workers' sums, not the last one read."""
    def two_workers(batches: dict[str, int]) -> str:
        one = metrics(0, 0, batches, 0)
        return one + one.replace('worker_index="1"', 'worker_index="2"')

    before = parse_metrics(two_workers({}))
    after = parse_metrics(two_workers({"1.0": 3, "2.0": 1}))
    view = server_view(before, after)
    assert view.batch_sizes == {"sentiment.classify": {1.0: 6, 2.0: 2, 4.0: 0, float("inf"): 0}}
    assert view.batch_means["sentiment.classify"] == (6 * 1 + 2 * 2) / 8


def test_agreeing_views_are_reported_as_agreeing(tmp_path):
    locust = read_locust(write_locust(tmp_path, requests=103, failures=3))
    assert locust["/v1/sentiment [1]"].failures_by_status == {"503": 3}
    view = server_view(parse_metrics(metrics(10, 0, {}, 0)), parse_metrics(metrics(110, 3, {}, 0)))
    assert disagreements(locust, view, users=4) == []
    assert "Yes:" in summary_markdown(locust, view, users=4)


def test_counts_that_differ_beyond_the_requests_in_flight_are_flagged(tmp_path):
    locust = read_locust(write_locust(tmp_path, requests=110, failures=10))
    view = server_view(parse_metrics(metrics(10, 0, {}, 0)), parse_metrics(metrics(60, 0, {}, 0)))
    problems = disagreements(locust, view, users=4)
    assert any("/v1/sentiment: Locust sent 110, the server counted 50" in p for p in problems)
    assert any(p.startswith("5xx: Locust saw 10, the server counted 0") for p in problems)
    assert "DISAGREE" in summary_markdown(locust, view, users=4)


def history_of(rows: list[tuple[int, float, float, float]]) -> dict[str, dict[str, list[float]]]:
    columns: dict[str, list[float]] = {"User Count": [], "Requests/s": [], "Failures/s": [], "95%": []}
    for users, rps, failures, p95 in rows:
        for key, value in zip(columns, (users, rps, failures, p95), strict=True):
            columns[key].append(value)
    return {"Aggregated": columns}


def test_the_knee_is_the_fewest_users_reaching_90_percent_of_peak_and_failures_are_located():
    history = history_of([(0, 0.0, 0.0, float("nan")), (8, 0.0, 0.0, float("nan")),  # spawning
                          (8, 100.0, 0.0, 50.0), (8, 110.0, 0.0, 70.0), (16, 170.0, 0.0, 90.0),
                          (24, 200.0, 0.0, 150.0), (32, 205.0, 1.5, 400.0), (32, 195.0, 0.5, 420.0)])
    rows = by_user_count(history)
    assert [(u, round(r), round(f, 2)) for u, r, f, _ in rows] == [(8, 105, 0.0), (16, 170, 0.0),
                                                                   (24, 200, 0.0), (32, 200, 1.0)]
    text = knee_markdown(rows)
    assert "Peak 200.0 req/s; the knee is at 24 users (90% of the peak); failures first at 32 users." in text
    assert "| 16 | 170.0 | 0.00 | 90 |" in text
    clean = knee_markdown(by_user_count(history_of([(8, 100.0, 0.0, 50.0), (16, 100.0, 0.0, 90.0)])))
    assert "the knee is at 8 users" in clean and "no failures at any step." in clean
    assert knee_markdown(rows[:1]) == "" and by_user_count({}) == []
