"""Trains the SST-2 sentiment classifier, exports it as TorchScript and registers it.

    python -m training.train_sentiment                 # full run, writes models/artifacts/sentiment
    python -m training.train_sentiment --dry-run       # one batch, export, reload, register
    python -m training.train_sentiment --cell gru --hidden-size 256
"""

from __future__ import annotations

import csv
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from models.rnn import pad_sequences
from models.sentiment import SentimentConfig, SentimentRNN
from models.text import UNK_ID, Vocab, build_vocab
from training.config import parse_config, to_dict
from training.export import export_and_reload, sha256_file
from training.loop import fit, seed_everything

DATA = Path("training") / "data" / "sst2"  # relative to the repository root, where make runs
LABELS = ("negative", "positive")


@dataclass(frozen=True)
class TrainSentimentConfig:
    train_path: str = str(DATA / "glue_train.tsv")
    dev_path: str = str(DATA / "glue_dev.tsv")
    out_dir: str = "models/artifacts/sentiment"
    register: bool = True
    cell: str = "lstm"
    bidirectional: bool = True
    embedding_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.5
    word_dropout: float = 0.1
    min_freq: int = 1
    max_tokens: int = 256
    max_chars: int = 2000
    batch_size: int = 64
    epochs: int = 5
    lr: float = 2e-3
    weight_decay: float = 0.01
    clip_grad_norm: float = 1.0
    patience: int = 3
    seed: int = 1234
    threads: int = 2
    dry_run: bool = False


def read_tsv(path: str) -> list[tuple[str, int]]:
    """Reads GLUE ``sentence<TAB>label`` rows."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header != ["sentence", "label"]:
            raise ValueError(f"{path}: expected header sentence<TAB>label, got {header}")
        return [(sentence.strip(), int(label)) for sentence, label in reader]


def batches(
    examples: list[tuple[list[int], int]], batch_size: int, rng: random.Random | None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Groups examples of similar length into batches (less padding), shuffled when ``rng`` is set."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    if rng is not None:
        # Sort within large random chunks so each epoch sees different neighbours.
        rng.shuffle(order)
        chunk = batch_size * 50
        order = [i for start in range(0, len(order), chunk)
                 for i in sorted(order[start:start + chunk], key=lambda i: len(examples[i][0]))]
    groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    out = []
    for group in groups:
        tokens, lengths = pad_sequences([examples[i][0] for i in group])
        labels = torch.tensor([examples[i][1] for i in group], dtype=torch.long)
        out.append((tokens, lengths, labels))
    return out


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(TrainSentimentConfig, argv, description=__doc__)
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)

    train_rows, dev_rows = read_tsv(config.train_path), read_tsv(config.dev_path)
    vocab = Vocab(build_vocab((text for text, _ in train_rows), min_freq=config.min_freq))
    train = [(ids, label) for text, label in train_rows if (ids := vocab.encode(text))]
    dev = [(vocab.encode(text) or [UNK_ID], label) for text, label in dev_rows]
    print(f"train {len(train)} examples, dev {len(dev)}, vocab {len(vocab)}", flush=True)

    model_config = SentimentConfig(
        vocab_size=len(vocab), embedding_dim=config.embedding_dim, hidden_size=config.hidden_size,
        num_layers=config.num_layers, cell=config.cell, bidirectional=config.bidirectional,
        dropout=config.dropout,
    )
    model = SentimentRNN(model_config)
    rng = random.Random(config.seed)
    dev_batches = batches(dev, 256, rng=None)

    def loss_fn(model, batch):
        tokens, lengths, labels = batch
        if config.word_dropout > 0:  # replace random words by <unk> so unseen words are handled
            drop = (torch.rand(tokens.shape) < config.word_dropout) & (tokens != 0)
            tokens = tokens.masked_fill(drop, UNK_ID)
        return F.cross_entropy(model(tokens, lengths), labels)

    def evaluate(model):
        correct, loss, count = 0, 0.0, 0
        for tokens, lengths, labels in dev_batches:
            logits = model(tokens, lengths)
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            count += len(labels)
        return {"dev_accuracy": correct / count, "dev_loss": loss / count}

    result = fit(
        model, loss_fn, lambda epoch: batches(train, config.batch_size, rng), evaluate,
        select="dev_accuracy", epochs=config.epochs, lr=config.lr,
        weight_decay=config.weight_decay, clip_grad_norm=config.clip_grad_norm,
        patience=config.patience, max_steps=1 if config.dry_run else None, desc="sentiment",
    )
    print(f"best epoch {result.best_epoch}: {result.best_metrics}, {result.seconds:.0f} s", flush=True)

    metadata = {
        "task": "sentiment",
        "cell": config.cell,
        "labels": list(LABELS),
        "vocab": vocab.itos,
        "max_tokens": config.max_tokens,
        "max_chars": config.max_chars,
        "model_config": model_config.to_dict(),
        "train_config": to_dict(config),
        "data": {
            "train": {"path": Path(config.train_path).name, "sha256": sha256_file(config.train_path),
                      "examples": len(train)},
            "dev": {"path": Path(config.dev_path).name, "sha256": sha256_file(config.dev_path),
                    "examples": len(dev)},
        },
        "metrics": {**result.best_metrics, "best_epoch": result.best_epoch,
                    "train_seconds": round(result.seconds, 1)},
        "history": result.history,
        "dry_run": config.dry_run,
    }
    out_dir = Path(config.out_dir)
    # Reload the artifact and check that it reproduces the eager model before anything serves it.
    full, scripted, loaded = export_and_reload(model, out_dir, metadata, config)
    tokens, lengths, _ = dev_batches[0]
    with torch.no_grad():
        torch.testing.assert_close(scripted(tokens, lengths), model(tokens, lengths))
    assert loaded["vocab"] == vocab.itos
    if config.register:
        from training.registry import register

        print(f"registered {register('sentiment', out_dir)}", flush=True)
    return full


if __name__ == "__main__":
    main(sys.argv[1:])
