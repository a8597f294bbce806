"""Summarises a Locust run and the server's own view of it, and says where the two disagree.

    python -m load.report load/reports            # after `python -m load.run` (which calls it)

Reads, under the report folder:

* ``locust_stats.csv``, ``locust_failures.csv`` and ``locust_stats_history.csv`` (Locust's
  ``--csv load/reports/locust --csv-full-history``);
* ``metrics_before.txt`` and ``metrics_after.txt``: the server's ``/metrics`` read just before and
  just after the run.

Writes ``summary.md`` (and prints it): per endpoint, requests/s, p50/p95/p99 and failures by status
code; the server's requests per endpoint and status, the batch-size distribution of every batched
method (``bentoml_service_adaptive_batch_size``: requests merged per model call), the padding ratio
(``rnnserve_model_batch_padding_ratio``) and padding waste (``rnnserve_model_padding_tokens_total``);
and ``throughput.png`` / ``latency.png``, charts over time from the stats history.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from services.local_server import Samples, parse_metrics

STATUS_IN_ERROR = re.compile(r"(?:status|HTTPError|HTTP)\D{0,3}([1-5]\d\d)\b")
ENTRY_SERVICE = "rnnserve"


# Locust's view ------------------------------------------------------------------------------------


@dataclass
class EndpointStats:
    name: str
    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float
    failures_by_status: dict[str, int] = field(default_factory=dict)


def route_of(name: str) -> str:
    """The route of a Locust request name: ``/v1/sentiment [2-16]`` -> ``/v1/sentiment``."""
    return name.split(" ", 1)[0]


def status_of(error: str) -> str:
    """The HTTP status a failure message names (``status 503: ...``), else the error's kind."""
    if match := STATUS_IN_ERROR.search(error):
        return match.group(1)
    return re.split(r"[(:\s]", error.strip(), maxsplit=1)[0][:40] or "other"


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def read_locust(prefix: Path) -> dict[str, EndpointStats]:
    """Per request name (plus ``Aggregated``) from ``<prefix>_stats.csv`` and ``_failures.csv``."""
    stats: dict[str, EndpointStats] = {}
    with open(f"{prefix}_stats.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            stats[row["Name"]] = EndpointStats(
                name=row["Name"], requests=int(row["Request Count"]), failures=int(row["Failure Count"]),
                rps=_number(row["Requests/s"]), p50=_number(row["50%"]), p95=_number(row["95%"]),
                p99=_number(row["99%"]))
    failures = Path(f"{prefix}_failures.csv")
    if failures.is_file():
        with open(failures, newline="") as handle:
            for row in csv.DictReader(handle):
                status = status_of(row["Error"])
                for name in (row["Name"], "Aggregated"):
                    if name in stats:
                        by_status = stats[name].failures_by_status
                        by_status[status] = by_status.get(status, 0) + int(row["Occurrences"])
    return stats


def read_history(prefix: Path) -> dict[str, dict[str, list[float]]]:
    """Columns over time per request name from ``<prefix>_stats_history.csv``."""
    series: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    path = Path(f"{prefix}_stats_history.csv")
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            columns = series[row["Name"]]
            for key in ("Timestamp", "User Count", "Requests/s", "Failures/s", "50%", "95%", "99%"):
                columns[key].append(_number(row[key]))
    return series


# The server's view --------------------------------------------------------------------------------


def delta(before: Samples, after: Samples, name: str) -> list[tuple[dict[str, str], float]]:
    """``after - before`` of every sample called ``name`` (a missing ``before`` counts as 0)."""
    return [(dict(labels), value - before.get((sample, labels), 0.0))
            for (sample, labels), value in after.items() if sample == name]


@dataclass
class ServerView:
    requests: dict[str, dict[str, int]]  # route -> status -> count, on the entry service
    batch_sizes: dict[str, dict[float, int]]  # service.method -> bucket upper bound -> calls
    batch_means: dict[str, float]
    padding_ratio: dict[str, tuple[int, float]]  # model -> (batches, mean padding ratio)
    padding_waste: dict[str, tuple[int, int]]  # model -> (padded positions, real tokens)


def server_view(before: Samples, after: Samples) -> ServerView:
    requests: dict[str, dict[str, int]] = defaultdict(dict)
    for labels, value in delta(before, after, "bentoml_service_request_total"):
        if labels.get("service_name") == ENTRY_SERVICE and value > 0:
            requests[labels["endpoint"]][labels["http_response_code"]] = round(value)
    def batcher(labels: dict[str, str]) -> str:
        # runner_name names the batcher's model: the service's name for a model service's batchable
        # API, the model's for a batcher inside the entry (services/inprocess.py).
        return f"{labels.get('runner_name') or labels.get('service_name')}.{labels.get('method_name')}"

    cumulative: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in delta(before, after, "bentoml_service_adaptive_batch_size_bucket"):
        cumulative[batcher(labels)][float(labels["le"])] += value  # summed over workers
    batch_sizes: dict[str, dict[float, int]] = {}
    for key, buckets in cumulative.items():
        previous, counts = 0.0, {}
        for bound in sorted(buckets):
            counts[bound] = round(buckets[bound] - previous)
            previous = buckets[bound]
        if sum(counts.values()) > 0:
            batch_sizes[key] = counts
    sums: dict[str, float] = defaultdict(float)
    for labels, value in delta(before, after, "bentoml_service_adaptive_batch_size_sum"):
        sums[batcher(labels)] += value  # summed over workers, like the buckets
    batch_means = {key: sums.get(key, 0.0) / max(1, sum(counts.values()))
                   for key, counts in batch_sizes.items()}
    ratio_sum = {lb["model"]: v for lb, v in delta(before, after, "rnnserve_model_batch_padding_ratio_sum")}
    padding_ratio = {lb["model"]: (round(v), ratio_sum.get(lb["model"], 0.0) / v)
                     for lb, v in delta(before, after, "rnnserve_model_batch_padding_ratio_count") if v > 0}
    tokens = {lb["model"]: v for lb, v in delta(before, after, "rnnserve_model_input_length_tokens_sum")}
    padding_waste = {lb["model"]: (round(v), round(tokens.get(lb["model"], 0.0)))
                     for lb, v in delta(before, after, "rnnserve_model_padding_tokens_total")
                     if tokens.get(lb["model"], 0.0) > 0}
    return ServerView(dict(requests), batch_sizes, batch_means, padding_ratio, padding_waste)


# Comparing and writing ----------------------------------------------------------------------------


def disagreements(locust: dict[str, EndpointStats], server: ServerView, users: int) -> list[str]:
    """Where Locust's and the server's request counts differ by more than requests left in flight.

    Locust counts a request when its answer arrives; the server when it has answered. Up to one
    request per user can be on the wire at either end of the run, so that much slack is allowed.
    """
    by_route: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
    for name, stats in locust.items():
        if name != "Aggregated":
            total, failed = by_route[route_of(name)]
            by_route[route_of(name)] = (total + stats.requests, failed + stats.failures)
    problems = []
    # Locust's CSV is written before the users' on_stop requests (session deletes): those show up on
    # the server only, within the same slack.
    routes = set(by_route) | {route for route in server.requests if route.startswith("/v1/")}
    for route in sorted(routes):
        total = by_route[route][0]
        seen = sum(server.requests.get(route, {}).values())
        slack = max(2, users, math.ceil(0.01 * total))
        if abs(seen - total) > slack:
            problems.append(f"{route}: Locust sent {total}, the server counted {seen} "
                            f"(difference {seen - total:+d}, more than the {slack} in flight)")
    locust_errors = sum(s.failures_by_status.get(code, 0) for s in locust.values() if s.name != "Aggregated"
                        for code in s.failures_by_status if code.startswith("5"))
    server_errors = sum(n for codes in server.requests.values() for code, n in codes.items()
                        if code.startswith("5"))
    if abs(locust_errors - server_errors) > max(2, users):
        problems.append(f"5xx: Locust saw {locust_errors}, the server counted {server_errors}")
    return problems


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def summary_markdown(locust: dict[str, EndpointStats], server: ServerView | None, users: int) -> str:
    lines = ["## Locust's view", "",
             "| endpoint | requests | req/s | p50 ms | p95 ms | p99 ms | failures | by status |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in sorted(locust.items(), key=lambda item: (item[0] == "Aggregated", item[0])):
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(s.failures_by_status.items())) or "-"
        lines.append(f"| {name} | {s.requests} | {s.rps:.1f} | {_ms(s.p50)} | {_ms(s.p95)} | {_ms(s.p99)} "
                     f"| {s.failures} | {statuses} |")
    if server is None:
        return "\n".join(lines) + "\n"
    lines += ["", "## The server's view (/metrics after - before)", "",
              "| endpoint (entry service) | requests | by status |", "|---|---:|---|"]
    for route, codes in sorted(server.requests.items()):
        lines.append(f"| {route} | {sum(codes.values())} | "
                     + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())) + " |")
    lines += ["", "Requests merged per model call (`bentoml_service_adaptive_batch_size`):", "",
              "| method | calls | mean | distribution (<= bound: calls) |", "|---|---:|---:|---|"]
    for key, counts in sorted(server.batch_sizes.items()):
        shown = ", ".join(f"<={bound:g}: {n}" for bound, n in counts.items() if n)
        lines.append(f"| {key} | {sum(counts.values())} | {server.batch_means[key]:.1f} | {shown} |")
    lines += ["", "Padding (`rnnserve_model_batch_padding_ratio`, `rnnserve_model_padding_tokens_total`):",
              "", "| model | model calls | mean padding ratio | padded positions | real tokens | waste |",
              "|---|---:|---:|---:|---:|---:|"]
    for model, (calls, ratio) in sorted(server.padding_ratio.items()):
        padded, real = server.padding_waste.get(model, (0, 0))
        waste = padded / (padded + real) if padded + real else 0.0
        lines.append(f"| {model} | {calls} | {ratio:.3f} | {padded} | {real} | {waste:.1%} |")
    problems = disagreements(locust, server, users)
    lines += ["", "## Do the two views agree?", ""]
    lines += [f"- DISAGREE: {p}" for p in problems] if problems else [
        "Yes: per endpoint, the server counted as many requests as Locust sent (within the requests "
        "in flight), and the same number of 5xx."]
    return "\n".join(lines) + "\n"


def charts(history: dict[str, dict[str, list[float]]], out: Path) -> list[Path]:
    """Throughput and latency over time: one line per endpoint, and users on a second axis."""
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggregated = history.get("Aggregated") or next(iter(history.values()))
    start = aggregated["Timestamp"][0]
    written = []
    for filename, title, keys in (
        ("throughput.png", "Throughput", [("Requests/s", "req/s"), ("Failures/s", "failures/s")]),
        ("latency.png", "Latency (all endpoints)", [("50%", "p50 ms"), ("95%", "p95 ms"), ("99%", "p99 ms")]),
    ):
        fig, axis = plt.subplots(figsize=(10, 4.5))
        if filename == "throughput.png":
            for name, columns in sorted(history.items()):
                seconds = [t - start for t in columns["Timestamp"]]
                style = {"linewidth": 2.2, "color": "black"} if name == "Aggregated" else {"linewidth": 1}
                axis.plot(seconds, columns["Requests/s"], label=f"{name} req/s", **style)
            seconds = [t - start for t in aggregated["Timestamp"]]
            if any(aggregated["Failures/s"]):
                axis.plot(seconds, aggregated["Failures/s"], color="red", label="failures/s")
            axis.set_ylabel("requests per second")
        else:
            seconds = [t - start for t in aggregated["Timestamp"]]
            for key, label in keys:
                axis.plot(seconds, aggregated[key], label=label)
            axis.set_ylabel("milliseconds")
            axis.set_yscale("log")
        users = axis.twinx()
        users.plot(seconds, aggregated["User Count"], color="grey", linestyle=":", label="users")
        users.set_ylabel("users")
        axis.set_xlabel("seconds since start")
        axis.set_title(title)
        handles, labels = axis.get_legend_handles_labels()
        more_handles, more_labels = users.get_legend_handles_labels()
        axis.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="upper left")
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        written.append(out / filename)
    return written


def by_user_count(history: dict[str, dict[str, list[float]]]) -> list[tuple[int, float, float, float]]:
    """(users, mean req/s, mean failures/s, median p95 ms) per user count the run held, from the
    aggregated history; the seconds while Locust spawned or stopped (no request yet) are left out."""
    aggregated = history.get("Aggregated")
    if not aggregated:
        return []
    steps: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for users, rps, failures, p95 in zip(aggregated["User Count"], aggregated["Requests/s"],
                                         aggregated["Failures/s"], aggregated["95%"], strict=True):
        if users > 0 and rps > 0:
            steps[int(users)].append((rps, failures, p95))
    rows = []
    for users, samples in sorted(steps.items()):
        p95s = sorted(p for _, _, p in samples if not math.isnan(p))
        median_p95 = p95s[len(p95s) // 2] if p95s else math.nan
        rows.append((users, sum(r for r, _, _ in samples) / len(samples),
                     sum(f for _, f, _ in samples) / len(samples), median_p95))
    return rows


def knee_markdown(rows: list[tuple[int, float, float, float]]) -> str:
    """Where the load stopped paying: throughput per user count, the knee (the fewest users that reach
    90% of the peak throughput; past it more users only queue) and the first user count with failures."""
    if len(rows) < 2:
        return ""
    peak = max(rps for _, rps, _, _ in rows)
    knee = next(users for users, rps, _, _ in rows if rps >= 0.9 * peak)
    failing = next((users for users, _, failures, _ in rows if failures > 0), None)
    lines = ["## Where the knee is", "", "| users | req/s | failures/s | p95 ms |", "|---:|---:|---:|---:|"]
    lines += [f"| {u} | {r:.1f} | {f:.2f} | {_ms(p)} |" for u, r, f, p in rows]
    lines += ["", f"Peak {peak:.1f} req/s; the knee is at {knee} users (90% of the peak); "
              + (f"failures first at {failing} users." if failing else "no failures at any step.")]
    return "\n".join(lines) + "\n"


def write_report(out: Path, users: int, prefix: str = "locust") -> str:
    """Writes ``summary.md`` and the charts under ``out``; returns the summary text."""
    locust = read_locust(out / prefix)
    before, after = out / "metrics_before.txt", out / "metrics_after.txt"
    server = (server_view(parse_metrics(before.read_text()), parse_metrics(after.read_text()))
              if before.is_file() and after.is_file() else None)
    text = summary_markdown(locust, server, users)
    history = read_history(out / prefix)
    if knee := knee_markdown(by_user_count(history)):
        text += "\n" + knee
    written = charts(history, out)
    if written:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in written) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=Path("load/reports"))
    parser.add_argument("--users", type=int, default=32, help="peak users (slack when comparing counts)")
    args = parser.parse_args(argv)
    print(write_report(args.out, args.users))


if __name__ == "__main__":
    main()
