"""COCO-format captions: a ``captions.json`` plus an image folder, for training on real photos.

The format is the one shipped in ``training/data/captioning/coco_mini_cc``::

    {"images": [{"file_name": "images/000000000790.jpg", "captions": ["...", ...], ...}, ...]}

A file in the official COCO layout (``images`` with ``id``/``file_name`` and a separate
``annotations`` list of ``{"image_id", "caption"}``) is read too. Images go through the same
deterministic conversion as served uploads (``models.images``), so training and serving see the
same pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.images import ImageLimits, decode_image, to_pixels

LIMITS = ImageLimits(max_bytes=64 << 20, max_pixels=64 << 20)


@dataclass(frozen=True)
class CaptionedImage:
    file_name: str
    pixels: np.ndarray  # (S, S, 3) uint8
    captions: tuple[str, ...]


def read_captions(path: str | Path) -> list[tuple[str, list[str]]]:
    """(file name relative to the json's folder, captions) per image, in file order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise ValueError(f"{path}: expected a non-empty 'images' list")
    if "annotations" in data:  # official COCO layout
        by_id: dict[int, list[str]] = {}
        for annotation in data["annotations"]:
            by_id.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
        rows = [(image["file_name"], by_id.get(image["id"], [])) for image in images]
    else:
        rows = [(image["file_name"], [c.strip() for c in image["captions"]]) for image in images]
    missing = [name for name, captions in rows if not captions]
    if missing:
        raise ValueError(f"{path}: {len(missing)} images have no caption, e.g. {missing[0]}")
    return rows


def load_coco(captions_path: str | Path, image_size: int, image_dir: str | Path | None = None,
              limit: int | None = None) -> list[CaptionedImage]:
    """Loads and converts every image listed in ``captions_path`` (the first ``limit`` if set)."""
    captions_path = Path(captions_path)
    root = Path(image_dir) if image_dir is not None else captions_path.parent
    out = []
    for file_name, captions in read_captions(captions_path)[:limit]:
        path = root / file_name
        if not path.is_file() and (root / "images" / file_name).is_file():
            path = root / "images" / file_name  # official layout: bare file names
        decoded = decode_image(path.read_bytes(), LIMITS)
        out.append(CaptionedImage(file_name, to_pixels(decoded.image, image_size), tuple(captions)))
    return out
