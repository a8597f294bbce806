"""The build definitions share one pinned dependency set (constraints.txt).

bentofile.yaml installs deploy/requirements.txt, which deploy/bento_requirements.py writes from
pyproject.toml and constraints.txt; deploy/context.sh (the Dockerfile's wheelhouse) and `make setup`
install under ``-c constraints.txt``. These checks fail when one of them drifts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
import bento_requirements  # noqa: E402


def test_bento_requirements_are_current():
    assert (ROOT / "deploy" / "requirements.txt").read_text() == bento_requirements.render(), (
        "run python deploy/bento_requirements.py")


def test_bento_requirements_pin_every_constraint():
    lines = [line for line in bento_requirements.render().splitlines() if line and not line.startswith("#")]
    for pin in (ROOT / "constraints.txt").read_text().splitlines():
        pin = pin.split("#", 1)[0].strip()
        if pin:
            assert pin in lines, pin


def test_a_conflicting_pin_is_refused(monkeypatch, tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["bentoml==1.4.39"]\n')
    (tmp_path / "constraints.txt").write_text("bentoml==1.4.40\n")
    monkeypatch.setattr(bento_requirements, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"bentoml==1\.4\.39"):
        bento_requirements.render()


def test_bentofile_builds_the_entry_from_sources_only():
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bentofile["service"] == "services.api:Api"
    assert bentofile["python"]["requirements_txt"] == "deploy/requirements.txt"
    assert bentofile["python"]["lock_packages"] is False
    assert "models/artifacts/" in bentofile["exclude"]


def test_every_image_build_uses_the_constraints():
    assert "-c \"$root/constraints.txt\"" in (ROOT / "deploy" / "context.sh").read_text()
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
