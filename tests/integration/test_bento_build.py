"""BentoML's own path (slow: a `bentoml build` and a `bentoml serve <bento>` of every model).

From a checkout: register the committed artifacts into a fresh BENTOML_HOME, `bentoml build` with
bentofile.yaml, then serve the Bento by its tag (not the source tree) and get one answer per model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, Server, register_artifacts

sys.path.insert(0, str(ROOT / "deploy"))
import probe  # deploy/probe.py: one example request per model

pytestmark = pytest.mark.slow


def bentoml(home: Path, *args: str) -> str:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "bentoml", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str]]:
    home = tmp_path_factory.mktemp("bento_home")
    models = register_artifacts(home)
    # `--output tag` prints "__tag__:<name>:<version>"
    tag = bentoml(home, "build", "--output", "tag").strip().splitlines()[-1].removeprefix("__tag__:")
    return home, tag, models


@pytest.fixture(scope="module")
def bento_server(built: tuple[Path, str, list[str]]) -> Iterator[Server]:
    home, tag, _ = built
    server = Server(home, target=tag)
    # Server gives each process a home of its own that links the model store; the Bento store too.
    (home / f"serve-{server.port}" / "bentos").symlink_to(home / "bentos", target_is_directory=True)
    server.start()
    yield server
    server.stop()


def test_build_records_every_model_by_tag(built):
    home, tag, registered = built
    name, version = tag.split(":")
    assert name == "rnnserve"
    info = yaml.safe_load((home / "bentos" / name / version / "bento.yaml").read_text())
    recorded = {model["tag"] for service in info["services"] for model in service["models"]}
    assert recorded == set(registered), (recorded, registered)
    assert {service["name"] for service in info["services"]} == {"rnnserve", "caption", "forecast",
                                                                  "translate"}
    # Sources only: no artifact, test or deploy file is copied into the Bento.
    src = home / "bentos" / name / version / "src"
    assert (src / "services" / "api.py").is_file()
    assert not (src / "models" / "artifacts").exists() and not (src / "tests").exists()
    requirements = (home / "bentos" / name / version / "env" / "python" / "requirements.txt").read_text()
    assert "bentoml==1.4.40" in requirements and "starlette==" in requirements


def test_served_bento_answers_every_model(bento_server):
    with httpx.Client(base_url=bento_server.url, timeout=120) as client:
        served = {model["name"] for model in client.post(probe.MODELS_PATH, json={}).json()}
        assert served == set(probe.ENDPOINTS)
        for name, endpoint in probe.ENDPOINTS.items():
            response = client.post(endpoint.route, json=endpoint.example())
            assert response.status_code == 200, (name, response.text[:500])
