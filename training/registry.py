"""Registers exported artifacts in the BentoML model store under a versioned tag.

The version is derived from the artifact's sha256, so registering the same file twice is a no-op and
two different files never share a tag. Run as a script to import artifact directories:

    python -m training.registry models/artifacts/sentiment
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import bentoml

from models.artifact import METADATA_FILE, MODEL_FILE, sha256_file


def register(name: str, directory: str | Path) -> str:
    """Copies the artifact in ``directory`` into the model store; returns its tag."""
    directory = Path(directory)
    metadata = json.loads((directory / METADATA_FILE).read_text())
    actual = sha256_file(directory / MODEL_FILE)
    if actual != metadata["sha256"]:
        raise ValueError(f"{directory / MODEL_FILE}: sha256 {actual} does not match metadata "
                         f"{metadata['sha256']}; re-export the artifact")
    tag = f"{name}:{actual[:16]}"
    try:
        bentoml.models.get(tag)
        return tag
    except bentoml.exceptions.NotFound:
        pass
    labels = {"task": str(metadata.get("task", name)), "cell": str(metadata.get("cell", ""))}
    store_metadata = {
        "sha256": actual,
        "file": MODEL_FILE,
        "task": metadata.get("task", name),
        "cell": metadata.get("cell"),
        "metrics": metadata.get("metrics", {}),
    }
    with bentoml.models.create(tag, labels=labels, metadata=store_metadata) as model:
        shutil.copy2(directory / MODEL_FILE, model.path_of(MODEL_FILE))
        shutil.copy2(directory / METADATA_FILE, model.path_of(METADATA_FILE))
    return tag


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m training.registry ARTIFACT_DIR [ARTIFACT_DIR ...]", file=sys.stderr)
        return 2
    for directory in argv:
        name = Path(directory).name
        print(register(name, directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
