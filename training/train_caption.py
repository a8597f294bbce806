"""Trains the image captioner, evaluates both test parts, exports TorchScript and registers it.

    python -m training.train_caption                      # scenes: writes models/artifacts/caption
    python -m training.train_caption --cell lstm --attention false
    python -m training.train_caption --data coco --out-dir /tmp/caption_coco --register false
    python -m training.train_caption --dry-run --out-dir /tmp/caption_dry --register false
    python -m training.train_caption --init-from models/artifacts/caption --lr 0.001   # continue

``--data scenes`` (default) draws the procedural scenes of ``training/scenes.py``; ``--data coco``
reads a COCO-format ``captions.json`` and image folder (the shipped 51 photos are a smoke test of
that path: far too few to learn to caption photos).
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sacrebleu
import torch
from torch.nn import functional as F

from models.artifact import load_artifact
from models.caption import BOS_ID, EOS_ID, CaptionConfig, Captioner, caption_vocab
from models.images import PREPROCESS
from models.rnn import pad_sequences
from models.text import PAD_ID, Vocab, build_vocab, tokenize
from training import scenes as scene_gen
from training.config import parse_config, to_dict
from training.export import export_and_reload, load_weights, sha256_file
from training.loop import fit, seed_everything

DATA = Path(__file__).parent / "data" / "captioning"
REPORTS = Path(__file__).parent / "reports"


@dataclass(frozen=True)
class TrainCaptionConfig:
    data: str = "scenes"  # scenes | coco
    coco_captions: str = str(DATA / "coco_mini_cc" / "captions.json")
    coco_holdout_images: int = 6  # last N images of captions.json: never trained on
    coco_image_size: int = 64
    out_dir: str = "models/artifacts/caption"
    register: bool = True
    gallery: str = str(REPORTS / "caption_gallery.png")
    cell: str = "gru"
    attention: bool = True
    channels: tuple[int, ...] = (8, 16, 32, 64)
    embedding_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 1
    attention_size: int = 128
    dropout: float = 0.1
    train_scenes: int = 12000
    val_scenes: int = 500
    test_scenes: int = 1000
    max_length: int = 32  # default decoding limit served, tokens including <eos>
    batch_size: int = 64
    epochs: int = 5
    lr: float = 3e-3
    weight_decay: float = 0.01
    clip_grad_norm: float = 1.0
    patience: int = 2
    lr_schedule: str = "constant"  # constant | cosine (decays to lr / 50 by the last epoch)
    max_minutes: float = 0.0  # wall-clock budget for training; 0 = none
    init_from: str = ""  # an exported caption artifact to continue from (same vocabulary and sizes)
    eval_beam_size: int = 3
    seed: int = 1234
    threads: int = 1
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.data not in ("scenes", "coco"):
            raise ValueError(f"data must be 'scenes' or 'coco', got {self.data!r}")


@dataclass
class Split:
    pixels: np.ndarray  # (N, S, S, 3) uint8
    references: list[list[str]]  # captions per image (scenes: exactly one)
    shapes: list[tuple[scene_gen.Shape, ...]] | None = None  # scenes only: ground-truth attributes


def scene_split(count: int, split: str) -> Split:
    drawn = scene_gen.make_scenes(count, split)
    return Split(np.stack([s.image for s in drawn]), [[s.caption] for s in drawn],
                 [s.shapes for s in drawn])


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float: (x / 255 - mean) / std per channel."""
    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def make_batches(split: Split, vocab: Vocab, mean, std, batch_size: int,
                 rng: np.random.Generator | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, inputs ``<bos> w..``, targets ``w.. <eos>``), one pair per (image, caption)."""
    pairs = [(i, c) for i, refs in enumerate(split.references) for c in range(len(refs))]
    order = rng.permutation(len(pairs)) if rng is not None else np.arange(len(pairs))
    out = []
    for start in range(0, len(pairs), batch_size):
        chosen = [pairs[k] for k in order[start:start + batch_size]]
        ids = [vocab.encode(split.references[i][c]) for i, c in chosen]
        inputs, _ = pad_sequences([[BOS_ID, *x] for x in ids], PAD_ID)
        targets, _ = pad_sequences([[*x, EOS_ID] for x in ids], PAD_ID)
        images = normalise(split.pixels[[i for i, _ in chosen]], mean, std)
        out.append((images, inputs, targets))
    return out


def to_text(vocab: Vocab, ids: torch.Tensor, length: int) -> str:
    words = [vocab.itos[i] for i in ids[:length].tolist() if i not in (EOS_ID, PAD_ID)]
    return " ".join(words)


@torch.no_grad()
def decode(model, split: Split, vocab: Vocab, mean, std, max_length: int, beam_size: int = 1,
           batch_size: int = 256) -> list[str]:
    """Captions for every image of ``split`` (greedy when ``beam_size`` is 1)."""
    out = []
    for start in range(0, len(split.pixels), batch_size):
        images = normalise(split.pixels[start:start + batch_size], mean, std)
        limits = torch.full((len(images),), max_length, dtype=torch.long)
        if beam_size == 1:
            tokens, _, lengths = model.greedy(images, limits)
        else:
            tokens, _, lengths = model.beam_search(images, limits, beam_size)
        out += [to_text(vocab, row, int(n)) for row, n in zip(tokens, lengths, strict=True)]
    return out


def caption_metrics(predictions: list[str], split: Split) -> dict[str, float]:
    """Exact match, corpus BLEU-4 (sacrebleu, 13a tokenizer) and, for scenes, attribute accuracy."""
    references = split.references
    # sacrebleu wants one list per reference position; pad ragged reference sets with their first.
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else refs[0] for refs in references] for k in range(width)]
    metrics = {
        "exact_match": float(np.mean([p in refs for p, refs in zip(predictions, references,
                                                                      strict=True)])),
        "bleu4": float(sacrebleu.corpus_bleu(predictions, streams).score),
        "images": len(predictions),
    }
    if split.shapes is not None:
        totals = {a: [0, 0] for a in scene_gen.ATTRIBUTES}
        for prediction, shapes in zip(predictions, split.shapes, strict=True):
            for attribute, (correct, count) in scene_gen.attribute_matches(prediction, shapes).items():
                totals[attribute][0] += correct
                totals[attribute][1] += count
        for attribute, (correct, count) in totals.items():
            metrics[f"{attribute}_accuracy"] = correct / count
        metrics["attribute_accuracy"] = (sum(c for c, _ in totals.values())
                                         / sum(n for _, n in totals.values()))
    return metrics


def save_gallery(path: str | Path, panels: list[tuple[str, np.ndarray, str, bool]]) -> None:
    """A grid of test images titled with their generated captions (green: exact, red: not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 6
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.6, rows * 3.5))
    for axis in np.atleast_1d(axes).ravel():
        axis.axis("off")
    for axis, (label, pixels, caption, exact) in zip(np.atleast_1d(axes).ravel(), panels, strict=False):
        axis.imshow(pixels, interpolation="nearest")
        axis.set_title(f"[{label}]\n" + textwrap.fill(caption, 30), fontsize=7,
                       color="darkgreen" if exact else "firebrick")
    figure.suptitle("Generated captions (greedy) on held-out scenes; green = exact match", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.97), h_pad=1.5)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def load_data(config: TrainCaptionConfig) -> tuple[dict[str, Split], dict]:
    """The splits and a description of the data (with checksums) for the metadata."""
    if config.data == "scenes":
        counts = {"train": config.train_scenes, "val": config.val_scenes,
                  "test_fresh": config.test_scenes, "test_unseen": config.test_scenes}
        if config.dry_run:
            counts = {name: min(count, 64) for name, count in counts.items()}
        splits = {name: scene_split(count, name) for name, count in counts.items()}
        info = {
            "source": "procedural scenes (training/scenes.py)",
            "generator_sha256": sha256_file(scene_gen.__file__),
            "held_out_pairs": sorted(" ".join(p) for p in scene_gen.HELD_OUT_PAIRS),
            **{name: {"scenes": count, "seeds": f"0..{count - 1}",
                      "pixels_sha256": hashlib.sha256(splits[name].pixels.tobytes()).hexdigest()}
               for name, count in counts.items()},
        }
        return splits, info
    from training.coco import load_coco, read_captions

    items = load_coco(config.coco_captions, image_size=config.coco_image_size)
    holdout = min(config.coco_holdout_images, len(items) - 1)
    if config.dry_run:
        items = items[:8]
        holdout = 2
    train, test = items[:-holdout], items[-holdout:]

    def as_split(rows) -> Split:
        # References in the model's own form (lower case, tokenized), so BLEU compares like with like.
        return Split(np.stack([r.pixels for r in rows]),
                     [[" ".join(tokenize(c)) for c in r.captions] for r in rows])

    info = {
        "source": "COCO-format captions.json + images",
        "captions_path": Path(config.coco_captions).name,
        "captions_sha256": sha256_file(config.coco_captions),
        "images": len(read_captions(config.coco_captions)),
        "train_images": len(train), "holdout_images": len(test),
    }
    return {"train": as_split(train), "val": as_split(test), "test_holdout": as_split(test)}, info


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(TrainCaptionConfig, argv, description=__doc__)
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    splits, data_info = load_data(config)
    train = splits["train"]
    print(f"data ready in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{k} {len(v.pixels)}" for k, v in splits.items()), flush=True)

    words = build_vocab(c for refs in train.references for c in refs)[2:]
    if config.data == "scenes":  # every grammar word, even if a small training set missed one
        grammar = " ".join([*scene_gen.SIZES, *scene_gen.COLOURS, *scene_gen.KINDS,
                            *scene_gen.POSITIONS, "a and ,"])
        words = sorted(set(words) | set(tokenize(grammar)))
    vocab = Vocab(caption_vocab(words))
    previous = previous_meta = None
    if config.init_from:
        previous, previous_meta = load_artifact(config.init_from)
        if previous_meta["vocab"] != vocab.itos:
            raise ValueError(f"{config.init_from} has another vocabulary; use the same data")
    if previous_meta is not None:  # keep the input scale the weights were trained on
        mean, std = previous_meta["normalisation"]["mean"], previous_meta["normalisation"]["std"]
    else:
        scaled = train.pixels.reshape(-1, 3) / 255.0
        mean = [round(float(v), 4) for v in scaled.mean(axis=0)]
        std = [round(float(v), 4) for v in scaled.std(axis=0)]
    image_size = int(train.pixels.shape[1])
    longest = max(len(vocab.encode(c)) + 1 for refs in train.references for c in refs)
    print(f"vocab {len(vocab)}, longest caption {longest} tokens with <eos>, mean {mean}, std {std}",
          flush=True)

    model_config = CaptionConfig(
        vocab_size=len(vocab), image_size=image_size, channels=config.channels,
        embedding_dim=config.embedding_dim, hidden_size=config.hidden_size,
        num_layers=config.num_layers, cell=config.cell, attention=config.attention,
        attention_size=config.attention_size, dropout=config.dropout,
    )
    model = Captioner(model_config)
    if previous is not None:
        if previous_meta["model_config"] != json.loads(json.dumps(model_config.to_dict())):
            raise ValueError(f"{config.init_from} has model config {previous_meta['model_config']}, "
                             f"not {model_config.to_dict()}")
        load_weights(model, previous, previous_meta, config.init_from)
    rng = np.random.default_rng(config.seed)
    val = splits["val"]
    val_batches = make_batches(val, vocab, mean, std, 256, rng=None)

    def loss_fn(model, batch):
        images, inputs, targets = batch
        logits = model(images, inputs)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=PAD_ID)

    def evaluate(model):
        loss, count = 0.0, 0
        for images, inputs, targets in val_batches:
            logits = model(images, inputs)
            loss += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                          ignore_index=PAD_ID, reduction="sum"))
            count += int((targets != PAD_ID).sum())
        predictions = decode(model, val, vocab, mean, std, config.max_length)
        metrics = caption_metrics(predictions, val)
        return {"val_loss": loss / count, "val_exact_match": metrics["exact_match"],
                "val_bleu4": metrics["bleu4"]}

    select, maximize = ("val_exact_match", True) if config.data == "scenes" else ("val_loss", False)
    result = fit(
        model, loss_fn, lambda epoch: make_batches(train, vocab, mean, std, config.batch_size, rng),
        evaluate, select=select, maximize=maximize, epochs=config.epochs, lr=config.lr,
        weight_decay=config.weight_decay, clip_grad_norm=config.clip_grad_norm,
        patience=config.patience, max_steps=1 if config.dry_run else None,
        max_seconds=config.max_minutes * 60.0 or None, lr_schedule=config.lr_schedule, desc="caption",
    )
    print(f"best epoch {result.best_epoch}: {result.best_metrics}, {result.seconds:.0f} s", flush=True)

    test_names = [name for name in splits if name.startswith("test")]
    metrics: dict = {**result.best_metrics, "best_epoch": result.best_epoch,
                     "train_seconds": round(result.seconds, 1)}
    if previous_meta is not None:
        metrics["train_seconds_before"] = previous_meta["metrics"].get("train_seconds")
    predictions: dict[str, list[str]] = {}
    for name in test_names:
        predictions[name] = decode(model, splits[name], vocab, mean, std, config.max_length)
        beam = decode(model, splits[name], vocab, mean, std, config.max_length, config.eval_beam_size)
        metrics[name] = {"greedy": caption_metrics(predictions[name], splits[name]),
                         f"beam{config.eval_beam_size}": caption_metrics(beam, splits[name])}
        print(f"{name}: {json.dumps(metrics[name])}", flush=True)

    metadata = {
        "task": "caption",
        "cell": config.cell,
        "attention": config.attention,
        "data_kind": config.data,
        "vocab": vocab.itos,
        "special_ids": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID},
        "image_size": image_size,
        "normalisation": {"scale": 1 / 255, "mean": mean, "std": std,
                          "formula": "(pixel / 255 - mean) / std, per RGB channel, NCHW"},
        "preprocess": PREPROCESS,
        "max_length": config.max_length,
        "model_config": model_config.to_dict(),
        "train_config": to_dict(config),
        "data": data_info,
        "metrics": metrics,
        "history": result.history,
        "samples": {name: [{"reference": splits[name].references[i][0], "generated": predictions[name][i]}
                           for i in range(min(8, len(predictions[name])))] for name in test_names},
        "dry_run": config.dry_run,
    }
    out_dir = Path(config.out_dir)
    # Reload the artifact and check it reproduces the eager model before anything serves it.
    full, scripted, loaded = export_and_reload(model, out_dir, metadata, config)
    images, inputs, _ = val_batches[0]
    with torch.no_grad():
        torch.testing.assert_close(scripted(images, inputs), model(images, inputs))
    first = test_names[0]
    check = Split(splits[first].pixels[:64], splits[first].references[:64], None)
    assert decode(scripted, check, vocab, mean, std, config.max_length) == predictions[first][:64]
    assert loaded["vocab"] == vocab.itos

    if config.gallery and config.data == "scenes" and not config.dry_run:
        panels = []
        for name in test_names:
            label = "fresh" if name == "test_fresh" else "unseen combination"
            for i in range(12):
                truth = splits[name].references[i][0]
                panels.append((label, splits[name].pixels[i], predictions[name][i],
                               predictions[name][i] == truth))
        save_gallery(config.gallery, panels)
        print(f"gallery: {config.gallery}", flush=True)
    if config.register:
        from training.registry import register

        print(f"registered {register(out_dir.name, out_dir)}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return full


if __name__ == "__main__":
    main(sys.argv[1:])
