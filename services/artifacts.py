"""Loading side of the artifact contract (see ``training/export.py``): verify, then load."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"


class ArtifactError(RuntimeError):
    """The artifact is missing, truncated or does not match its recorded checksum."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    with warnings.catch_warnings():  # TorchScript's 2.13 deprecation notice; see training/export.py
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=DeprecationWarning)
        module = torch.jit.load(str(model_path), map_location=device, _extra_files=extra_files)
    module.eval()
    return module, json.loads(extra_files[METADATA_FILE])


def load_stored_model(stored: Any, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, Any], Any]:
    """Loads a model-store entry (``bentoml.models.BentoModel``) checked against its registered sha256.

    Returns:
        The scripted module, its metadata, and the ``ModelInfo`` every service reports.
    """
    from services.schemas.common import ModelInfo

    module, metadata = load_artifact(stored.path, expected_sha256=stored.info.metadata["sha256"],
                                     device=device)
    info = ModelInfo(name=stored.tag.name, version=str(stored.tag.version), task=metadata["task"],
                     cell=metadata["cell"], metrics=metadata.get("metrics", {}))
    return module, metadata, info
