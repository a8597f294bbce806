"""TorchScript export: the one place training turns a module into a servable artifact.

The artifact's file format (``model.pt`` with the metadata embedded, ``metadata.json`` beside it with
the sha256) is ``models/artifact.py``, which serving reads through the same module; this file adds
what only training knows: scripting, the provenance fields, the training config and the reload check.
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    load_artifact,
    save_artifact,
    sha256_file,
    torchscript_deprecation_silenced,
)
from training.config import to_dict

__all__ = ["METADATA_FILE", "MODEL_FILE", "export", "export_and_reload", "load_weights", "script",
           "sha256_file"]


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of ``module`` in eval mode."""
    with torchscript_deprecation_silenced():
        return torch.jit.script(module.eval())


def export(module: nn.Module, directory: str | Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Scripts ``module`` and writes the artifact directory; returns the full metadata.

    ``metadata`` must be JSON-serialisable; it should hold everything serving needs (vocabulary,
    normalisation, limits), the training config, data checksums and evaluation metrics.
    """
    metadata = {
        **metadata,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    return save_artifact(script(module), directory, metadata)


def load_weights(model: nn.Module, scripted: torch.jit.ScriptModule, metadata: dict[str, Any],
                 source: str | Path) -> None:
    """Copies an exported artifact's weights into the eager ``model`` to continue training
    (``--init-from``); the caller checks first that vocabularies and configs match.

    TorchScript's ``state_dict`` also lists the module's non-persistent buffers (fixed tables the
    eager model rebuilds itself); those are skipped, every other key must match exactly.
    """
    buffers = {name for name, _ in scripted.named_buffers()}
    wanted = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in scripted.state_dict().items()
                           if k in wanted or k not in buffers})
    print(f"initialised from {source} "
          f"({metadata['metrics'].get('train_seconds', '?')} s trained before)", flush=True)


def export_and_reload(model: nn.Module, directory: str | Path, metadata: dict[str, Any],
                      config: Any) -> tuple[dict[str, Any], torch.jit.ScriptModule, dict[str, Any]]:
    """Exports ``model``, writes the training config beside it (``train_config.json``) and loads the
    artifact back, checksum-verified, as serving will: the caller then checks that the scripted
    module reproduces the eager one before anything serves it.

    Returns:
        The metadata as written (with sha256), the reloaded scripted module and its metadata.
    """
    directory = Path(directory)
    full = export(model, directory, metadata)
    (directory / "train_config.json").write_text(json.dumps(to_dict(config), indent=1) + "\n")
    scripted, loaded = load_artifact(directory, expected_sha256=full["sha256"])
    return full, scripted, loaded
