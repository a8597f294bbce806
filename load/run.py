"""Starts the service on a free loopback port, runs Locust headless and bounded, writes reports.

    python -m load.run [--users 32] [--run-time 60s] [--tags sentiment]

Reports go to ``load/reports/``: Locust's CSV and HTML. The model store must hold the models
(``make register``); traffic only ever goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Server

REPORTS = ROOT / "load" / "reports"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--spawn-rate", type=int, default=16)
    parser.add_argument("--run-time", default="60s")
    parser.add_argument("--tags", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    server = Server(home).start()
    try:
        command = [
            sys.executable, "-m", "locust", "--config", str(ROOT / "load" / "locust.conf"),
            "--host", server.url, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
            "--run-time", args.run_time, "--csv", str(args.out / "locust"),
            "--html", str(args.out / "locust.html"),
        ]
        if args.tags:
            command += ["--tags", *args.tags]
        return subprocess.run(command, cwd=ROOT).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
