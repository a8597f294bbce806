"""Shared training pieces: typed config, export and checksum-verified loading."""

import json
from dataclasses import dataclass

import pytest
import torch

from models.artifact import ArtifactError, load_artifact
from training.config import build_config, parse_config
from training.export import export


@dataclass(frozen=True)
class Cfg:
    cell: str = "gru"
    hidden_size: int = 8
    lr: float = 1e-3
    bidirectional: bool = False
    dry_run: bool = False


def test_config_overrides_are_typed():
    config = parse_config(Cfg, ["--hidden-size", "16", "--lr", "0.5", "--bidirectional", "true",
                                "--dry-run"])
    assert config == Cfg(hidden_size=16, lr=0.5, bidirectional=True, dry_run=True)


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    with pytest.raises(KeyError, match="unknown config keys"):
        build_config(Cfg, {"hiden_size": 3})
    with pytest.raises(TypeError, match="must be int"):
        build_config(Cfg, {"hidden_size": "big"})
    with pytest.raises(TypeError, match="must be a bool"):
        build_config(Cfg, {"bidirectional": 1})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"cell": "lstm", "epochs": 3}))
    with pytest.raises(KeyError, match="epochs"):
        parse_config(Cfg, ["--config", str(path)])


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_export_then_load_round_trips_module_and_metadata(tmp_path):
    meta = export(Doubler(), tmp_path / "a", {"task": "double", "cell": "none", "metrics": {}})
    module, loaded = load_artifact(tmp_path / "a", expected_sha256=meta["sha256"])
    assert loaded["task"] == "double"
    torch.testing.assert_close(module(torch.ones(2)), torch.full((2,), 2.0))


def test_tampered_or_truncated_artifact_is_refused(tmp_path):
    meta = export(Doubler(), tmp_path / "a", {"task": "double"})
    path = tmp_path / "a" / "model.pt"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="does not match"):
        load_artifact(tmp_path / "a", expected_sha256=meta["sha256"])
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(tmp_path / "a")
