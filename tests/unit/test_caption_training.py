"""Captioning training paths end to end at toy size: scenes and the COCO-format loader.

Each run trains one batch (``--dry-run``), exports TorchScript, reloads it and checks it against the
eager model (inside ``main``), which is the whole artifact contract the service relies on.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.artifact import load_artifact
from training import train_caption
from training.coco import load_coco, read_captions
from training.train_caption import DATA, Split, caption_metrics

COCO = DATA / "coco_mini_cc" / "captions.json"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_scene_dry_run_exports_a_servable_artifact(tmp_path):
    out = tmp_path / "caption"
    full = train_caption.main(["--dry-run", "--out-dir", str(out), "--register", "false",
                               "--channels", "[4, 8]", "--hidden-size", "16", "--embedding-dim", "8"])
    module, metadata = load_artifact(out)
    assert (out / "metadata.json").is_file() and full["sha256"]
    for key in ("task", "cell", "metrics", "vocab", "image_size", "normalisation", "max_length",
                "special_ids", "model_config", "train_config", "data"):
        assert key in metadata, key
    assert metadata["task"] == "caption" and metadata["image_size"] == 64
    assert set(metadata["metrics"]) >= {"test_fresh", "test_unseen"}
    for part in ("test_fresh", "test_unseen"):
        greedy = metadata["metrics"][part]["greedy"]
        assert {"exact_match", "bleu4", "shape_accuracy", "colour_accuracy", "size_accuracy",
                "position_accuracy"} <= set(greedy)
    assert metadata["data"]["train"]["pixels_sha256"]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["dry_run"] is True
    tokens, _, lengths = module.beam_search(torch.zeros(2, 3, 64, 64), torch.tensor([4, 6]), 2)
    assert tokens.shape == (2, 6) and (lengths <= torch.tensor([4, 6])).all()


def test_coco_loader_reads_the_shipped_photos():
    rows = read_captions(COCO)
    assert len(rows) == 51 and all(len(captions) == 5 for _, captions in rows)
    items = load_coco(COCO, image_size=32, limit=3)
    assert [item.pixels.shape for item in items] == [(32, 32, 3)] * 3
    assert items[0].captions[0] == rows[0][1][0]


def test_coco_smoke_run_trains_exports_and_reloads(tmp_path):
    """The honest smoke test of the real-photo path: it runs, it is not a captioner."""
    out = tmp_path / "caption_coco"
    train_caption.main(["--data", "coco", "--dry-run", "--out-dir", str(out), "--register", "false",
                        "--channels", "[4, 8]", "--hidden-size", "16", "--embedding-dim", "8"])
    _, metadata = load_artifact(out)
    assert metadata["data_kind"] == "coco" and metadata["data"]["captions_sha256"]
    assert "test_holdout" in metadata["metrics"]
    assert len(metadata["vocab"]) > 50  # words of the real captions, not the scene grammar


def test_metrics_count_exact_matches_bleu_and_attributes():
    from training.scenes import make_scene

    scenes = [make_scene(seed, "test_fresh") for seed in range(4)]
    split = Split(np.stack([s.image for s in scenes]), [[s.caption] for s in scenes],
                  [s.shapes for s in scenes])
    perfect = caption_metrics([s.caption for s in scenes], split)
    assert perfect["exact_match"] == 1.0 and perfect["bleu4"] == pytest.approx(100.0)
    assert perfect["attribute_accuracy"] == 1.0
    wrong = caption_metrics(["a dog"] * 4, split)
    assert wrong["exact_match"] == 0.0 and wrong["attribute_accuracy"] == 0.0 and wrong["bleu4"] < 5
