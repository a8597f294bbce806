"""Shared fixtures. Tests are marked by folder: tests/unit, tests/integration, tests/e2e."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# The server helpers are shared with load/ (services/local_server.py); re-exported for the tests.
from services.local_server import ROOT, Server, batch_histogram, free_port, private_home

__all__ = ["ARTIFACTS", "ROOT", "Server", "batch_histogram", "free_port", "private_home",
           "register_artifacts"]

ARTIFACTS = ROOT / "models" / "artifacts"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in ("unit", "integration", "e2e"):
            if f"{os.sep}tests{os.sep}{kind}{os.sep}" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))


def register_artifacts(bentoml_home: Path) -> list[str]:
    """Registers every committed artifact into the store at ``bentoml_home``."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    dirs = sorted(str(p) for p in ARTIFACTS.iterdir() if (p / "model.pt").is_file())
    out = subprocess.run([sys.executable, "-m", "training.registry", *dirs], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True)
    return out.stdout.split()


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bentoml_home")
    register_artifacts(home)
    return home


@pytest.fixture(scope="session")
def server(bentoml_home: Path) -> Iterator[Server]:
    """One server with every committed model, shared by the integration tests."""
    srv = Server(bentoml_home).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http
