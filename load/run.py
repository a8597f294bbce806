"""Starts the service on a free loopback port, runs Locust headless and bounded, and reports.

    python -m load.run [--users 32] [--run-time 60s] [--models sentiment] [--shape step] [UserClass ...]
    python -m load.run --host http://127.0.0.1:3000     # against a server that is already running

Settings come from ``load/locust.conf``; the options here override them. Reports go to
``load/reports/``: Locust's CSV (with the full stats history) and HTML, the server's ``/metrics``
before and after, and ``summary.md`` with ``throughput.png`` and ``latency.png`` (``load/report.py``).
The model store must hold the models (``make register``); traffic only ever goes to 127.0.0.1 unless
``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import httpx

from load.report import write_report
from services.local_server import ROOT, Server

REPORTS = ROOT / "load" / "reports"


def read_metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def locust_command(host: str, out: Path, *, users: int | None = None, spawn_rate: int | None = None,
                   run_time: str | None = None, tags: list[str] | None = None, shape: str = "none",
                   user_classes: list[str] | None = None, prefix: str = "locust") -> list[str]:
    """The headless Locust command line: config file first, then what the caller overrides."""
    locustfiles = "load/locustfile.py" + (",load/shape.py" if shape == "step" else "")
    command = [sys.executable, "-m", "locust", "--config", str(ROOT / "load" / "locust.conf"),
               "-f", locustfiles, "--host", host, "--csv", str(out / prefix), "--csv-full-history",
               "--html", str(out / f"{prefix}.html")]
    if users is not None:
        command += ["--users", str(users)]
    if spawn_rate is not None:
        command += ["--spawn-rate", str(spawn_rate)]
    if run_time is not None:
        command += ["--run-time", run_time]
    if tags:
        command += ["--tags", *tags]
    return command + list(user_classes or [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("user_classes", nargs="*", help="only these user classes (default: all)")
    parser.add_argument("--users", type=int, default=None, help="peak users (locust.conf: 32)")
    parser.add_argument("--spawn-rate", type=int, default=None)
    parser.add_argument("--run-time", default=None, help="e.g. 60s (locust.conf: 60s)")
    parser.add_argument("--tags", nargs="*", default=[])
    parser.add_argument("--models", nargs="*", default=[],
                        help="only these models' users (load/<model>_locust.py); default: all")
    parser.add_argument("--shape", choices=("none", "step"), default="none",
                        help="step: load/shape.py, --steps equal steps up to --users")
    parser.add_argument("--host", help="use this running server instead of starting one")
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    if args.host:
        url = args.host.rstrip("/")
    else:
        home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
        server = Server(home).start()
        url = server.url
        print(f"server ready on {url} (log: {server.log_path})")
    try:
        (args.out / "metrics_before.txt").write_text(read_metrics(url))
        command = locust_command(url, args.out, users=args.users, spawn_rate=args.spawn_rate,
                                 run_time=args.run_time, tags=args.tags, shape=args.shape,
                                 user_classes=args.user_classes)
        print(" ".join(command))
        env = {**os.environ, **({"LOAD_MODELS": ",".join(args.models)} if args.models else {})}
        code = subprocess.run(command, cwd=ROOT, env=env).returncode
        (args.out / "metrics_after.txt").write_text(read_metrics(url))
    finally:
        if server is not None:
            server.stop()
    users = args.users or 32
    print(write_report(args.out, users))
    print(f"reports in {args.out}: summary.md, throughput.png, latency.png, locust.html, locust_*.csv")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
