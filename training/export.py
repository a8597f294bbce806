"""TorchScript export: the one place training turns a module into a servable artifact.

An artifact is a directory holding ``model.pt`` (TorchScript, with the metadata embedded as the extra
file ``metadata.json``) and ``metadata.json`` beside it, which adds the file's sha256. TorchScript is
deprecated upstream in favour of ``torch.export``; keeping export behind this one function (and
loading behind ``services.artifacts.load_artifact``) keeps a later switch to two functions.
"""

from __future__ import annotations

import json
import platform
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.artifacts import METADATA_FILE, MODEL_FILE, load_artifact, sha256_file
from training.config import to_dict

__all__ = ["METADATA_FILE", "MODEL_FILE", "export", "script", "sha256_file"]


@contextmanager
def torchscript_deprecation_silenced() -> Iterator[None]:
    """Silences TorchScript's 2.13 deprecation warnings, deliberately and only here.

    The user asked for TorchScript artifacts; the warnings only say it is deprecated in favour of
    ``torch.export``, which keeping export behind this module is there to make easy later.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*TorchScript.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.export.*", category=DeprecationWarning)
        yield


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of ``module`` in eval mode."""
    with torchscript_deprecation_silenced():
        return torch.jit.script(module.eval())


def export(module: nn.Module, directory: str | Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Scripts ``module`` and writes the artifact directory; returns the full metadata.

    ``metadata`` must be JSON-serialisable; it should hold everything serving needs (vocabulary,
    normalisation, limits), the training config, data checksums and evaluation metrics.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {
        **metadata,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    embedded = json.dumps(metadata, sort_keys=True)
    scripted = script(module)
    model_path = directory / MODEL_FILE
    with torchscript_deprecation_silenced():
        torch.jit.save(scripted, str(model_path), _extra_files={METADATA_FILE: embedded})
    full = {**metadata, "sha256": sha256_file(model_path), "file": MODEL_FILE}
    (directory / METADATA_FILE).write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    return full


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
