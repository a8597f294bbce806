"""deploy/gpu_check.py on a CPU machine: the comparison path (cpu against cpu) and the rebuild path
(models/ + exported weights, as on a machine whose older torch cannot load the TorchScript files)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
import gpu_check  # noqa: E402


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    for name in ("forecast", "sentiment"):
        shutil.copytree(ROOT / "models" / "artifacts" / name, tmp_path / name)
    return tmp_path


def test_compares_and_times_every_model(artifacts, capsys):
    code = gpu_check.main(["--artifacts", str(artifacts), "--target", "cpu", "--batch-sizes", "1,3",
                           "--seconds", "0.01"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "GPU CHECK OK" in out
    assert out.count(" ok ") == 4  # 2 models x 2 batch sizes


def test_rebuilds_from_code_and_weights(artifacts, capsys):
    with pytest.raises(SystemExit, match="export-weights"):
        gpu_check.load(artifacts / "forecast", force_rebuild=True)
    assert gpu_check.main(["--artifacts", str(artifacts), "--export-weights"]) == 0
    scripted, metadata, _ = gpu_check.load(artifacts / "forecast")
    rebuilt, _, how = gpu_check.load(artifacts / "forecast", force_rebuild=True)
    assert how.startswith("rebuilt")
    args = gpu_check.inputs("forecast", metadata, 5)
    assert (scripted(*args) - rebuilt(*args)).abs().max().item() < 1e-6


def test_without_cuda_it_says_so_and_checks_nothing(artifacts, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--artifacts", str(artifacts)]) == 2
    assert "no usable GPU" in capsys.readouterr().err
