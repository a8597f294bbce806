"""Loading side of the artifact contract: a model-store entry, checked against its registered sha256.

The file format itself (file names, embedded metadata, checksum, TorchScript load) is
``models/artifact.py``, shared with ``training/export.py``; ``ArtifactError`` and ``load_artifact``
are importable from here too.
"""

from __future__ import annotations

from typing import Any

import torch

from models.artifact import ArtifactError, load_artifact

__all__ = ["ArtifactError", "load_artifact", "load_stored_model"]


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
