"""The artifact file format: the one place that knows how a trained model is laid out on disk.

An artifact is a directory holding ``model.pt`` (TorchScript, with the metadata embedded as the extra
file ``metadata.json``) and ``metadata.json`` beside it, which adds the file's name and sha256.
Training writes it (``training/export.py`` through ``save_artifact``) and serving reads it
(``services/artifacts.py`` through ``load_artifact``). The format lives in ``models/`` because both
sides import ``models/`` and neither may import the other; it is the one module here that touches
files. TorchScript is deprecated upstream in favour of ``torch.export``; a later switch changes the
two functions below and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"


class ArtifactError(RuntimeError):
    """The artifact is missing, truncated or does not match its recorded checksum."""


@contextmanager
def torchscript_deprecation_silenced() -> Iterator[None]:
    """Silences TorchScript's 2.13 deprecation warnings, deliberately and only around its own calls.

    The artifacts are TorchScript by choice; the warnings only say it is deprecated in favour of
    ``torch.export``, which keeping save and load behind this module is there to make easy later.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*TorchScript.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.export.*", category=DeprecationWarning)
        yield


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_artifact(scripted: torch.jit.ScriptModule, directory: str | Path,
                  metadata: dict[str, Any]) -> dict[str, Any]:
    """Writes ``scripted`` with ``metadata`` embedded, and ``metadata.json`` beside it.

    Returns:
        The metadata as written to ``metadata.json``: ``metadata`` plus ``sha256`` and ``file``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / MODEL_FILE
    with torchscript_deprecation_silenced():
        torch.jit.save(scripted, str(model_path),
                       _extra_files={METADATA_FILE: json.dumps(metadata, sort_keys=True)})
    full = {**metadata, "sha256": sha256_file(model_path), "file": MODEL_FILE}
    (directory / METADATA_FILE).write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    return full


def load_artifact(
    directory: str | Path, expected_sha256: str | None = None, device: str = "cpu"
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Loads a TorchScript artifact after checking its sha256.

    Args:
        directory: holds ``model.pt`` and ``metadata.json``.
        expected_sha256: the checksum recorded at registration (the model store's metadata). When
            omitted, the one in ``metadata.json`` is used.
        device: where to map the weights.

    Returns:
        The scripted module in eval mode and the metadata embedded in it.
    """
    directory = Path(directory)
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(f"{model_path} is missing")
    if expected_sha256 is None:
        expected_sha256 = json.loads((directory / METADATA_FILE).read_text())["sha256"]
    actual = sha256_file(model_path)
    if actual != expected_sha256:
        raise ArtifactError(
            f"{model_path}: sha256 {actual} does not match the recorded {expected_sha256}; "
            "the file is truncated or was modified. Re-register the artifact."
        )
    extra_files = {METADATA_FILE: ""}
    with torchscript_deprecation_silenced():
        module = torch.jit.load(str(model_path), map_location=device, _extra_files=extra_files)
    module.eval()
    return module, json.loads(extra_files[METADATA_FILE])
