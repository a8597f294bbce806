"""Trains the English -> Spanish attention encoder-decoder, scores it with sacrebleu, exports, registers it.

    python -m training.train_translate                     # full run, writes models/artifacts/translate
    python -m training.train_translate --dry-run           # one batch, export, reload, register
    python -m training.train_translate --max-minutes 20 --cell lstm --attention additive

Data: Tatoeba English-Spanish pairs from www.manythings.org/anki and tatoeba.org (CC BY 2.0 FR), see
``training/data/SOURCES.md``. The split is by a hash of the English sentence, so every translation of one
English sentence lands in the same split and no source sentence is ever seen in two splits.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
import unicodedata
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch.nn import functional as F

from models.artifact import load_artifact
from models.rnn import pad_sequences
from models.translate import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, TranslateConfig, Translator
from training.config import parse_config, to_dict
from training.export import export_and_reload, load_weights, sha256_file
from training.loop import fit, seed_everything

DATA = Path(__file__).parent / "data" / "translation"
SAMPLE_SOURCE = "I love dogs."


@dataclass(frozen=True)
class TrainTranslateConfig:
    data_path: str = str(DATA / "spa-eng.zip")
    member: str = "spa-eng/spa.txt"
    out_dir: str = "models/artifacts/translate"
    register: bool = True
    # Split by sha256(English sentence) mod 1000: [0, test_per_mille) test, then dev, the rest train.
    test_per_mille: int = 30
    dev_per_mille: int = 20
    src_vocab_size: int = 5000
    tgt_vocab_size: int = 6000
    min_frequency: int = 2
    max_train_tokens: int = 40  # training pairs longer than this (either side, in subwords) are dropped
    max_input_tokens: int = 100  # the longest source the service accepts
    max_output_length: int = 80  # hard cap on generated subwords
    cell: str = "gru"
    attention: str = "general"
    embedding_dim: int = 192
    encoder_hidden_size: int = 192
    decoder_hidden_size: int = 384
    attention_size: int = 256
    dropout: float = 0.2
    label_smoothing: float = 0.1
    batch_size: int = 64
    epochs: int = 30
    max_minutes: float = 58.0  # wall-clock budget; the epoch running at the deadline stops early
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    clip_grad_norm: float = 1.0
    patience: int = 3
    dev_bleu_sentences: int = 1000
    beam_size: int = 4
    length_penalty: float = 1.0
    eval_batch_size: int = 64
    seed: int = 1234
    threads: int = 1  # on a shared 2-core box one thread trains ~5x faster than two (measured)
    # Continue training from an exported artifact directory (same data and tokenizer settings): the
    # tokenizers are retrained deterministically and must equal the artifact's, or the run stops.
    init_from: str = ""
    dry_run: bool = False


def normalize(text: str) -> str:
    """NFC and single spaces: the only changes made to text, so accents and punctuation survive."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def read_pairs(path: str, member: str) -> list[tuple[str, str]]:
    """Reads ``English<TAB>Spanish`` lines from the zip, in file order."""
    with zipfile.ZipFile(path) as archive:
        lines = archive.read(member).decode("utf-8").splitlines()
    pairs = []
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{path}:{member}:{number}: expected English<TAB>Spanish, got {line[:60]!r}")
        pairs.append((normalize(fields[0]), normalize(fields[1])))
    return pairs


def split_of(english: str, test_per_mille: int, dev_per_mille: int) -> str:
    """Deterministic split of one English sentence (and so of all its translations)."""
    bucket = int.from_bytes(hashlib.sha256(english.encode("utf-8")).digest()[:8], "big") % 1000
    if bucket < test_per_mille:
        return "test"
    if bucket < test_per_mille + dev_per_mille:
        return "dev"
    return "train"


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Byte-level BPE: decoding is the exact inverse of encoding, for any Unicode text.

    Every byte is in the base alphabet, so unseen characters (emoji, other scripts) are never
    ``<unk>``; case, punctuation and accents (¿ ¡ á ñ) come back unchanged.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index, f"{token} must have id {index}"
    return tokenizer


def encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [encoding.ids for encoding in tokenizer.encode_batch(texts)]


def group_references(pairs: list[tuple[str, str]]) -> OrderedDict[str, list[str]]:
    """English sentence -> every Spanish translation of it, in file order."""
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    for english, spanish in pairs:
        grouped.setdefault(english, []).append(spanish)
    return grouped


def train_batches(examples: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random,
                  deadline: float | None = None):
    """Length-bucketed, shuffled teacher-forcing batches; stops yielding once ``deadline`` passes."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * 50  # sort within random chunks: little padding, new neighbours each epoch
    order = [i for start in range(0, len(order), chunk)
             for i in sorted(order[start:start + chunk], key=lambda i: (len(examples[i][1]),
                                                                          len(examples[i][0])))]
    groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    for group in groups:
        if deadline is not None and time.monotonic() > deadline:
            return
        src, src_lengths = pad_sequences([examples[i][0] for i in group], PAD_ID)
        tgt_in, _ = pad_sequences([[BOS_ID, *examples[i][1]] for i in group], PAD_ID)
        tgt_out, _ = pad_sequences([[*examples[i][1], EOS_ID] for i in group], PAD_ID)
        yield src, src_lengths, tgt_in, tgt_out


def translate_texts(model, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, texts: list[str],
                    beam_size: int, max_length: int, length_penalty: float, batch_size: int,
                    max_input_tokens: int) -> list[str]:
    """Batched translation of many texts, sorted by length for little padding; output in input order."""
    encoded = [ids[:max_input_tokens] or [EOS_ID] for ids in encode_all(src_tokenizer, texts)]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    out: list[str] = [""] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            src, lengths = pad_sequences([encoded[i] for i in rows], PAD_ID)
            if beam_size == 1:
                tokens, out_lengths, _, _, _ = model.greedy(src, lengths, max_length, False)
            else:
                tokens, out_lengths, _, _, _ = model.beam_search(src, lengths, beam_size, max_length,
                                                                 length_penalty, False)
            for row, index in enumerate(rows):
                ids = tokens[row, : int(out_lengths[row])].tolist()
                out[index] = tgt_tokenizer.decode(ids, skip_special_tokens=True)
    return out


def score(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """sacrebleu BLEU and chrF; ``references[i]`` lists every reference of hypothesis i."""
    streams = max(len(r) for r in references)
    ref_streams = [[r[k] if k < len(r) else None for r in references] for k in range(streams)]
    return {
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, ref_streams).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, ref_streams).score, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(TrainTranslateConfig, argv, description=__doc__)
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    started = time.monotonic()

    pairs = read_pairs(config.data_path, config.member)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    for english, spanish in pairs:
        splits[split_of(english, config.test_per_mille, config.dev_per_mille)].append((english, spanish))
    sources = {name: {e for e, _ in rows} for name, rows in splits.items()}
    assert not (sources["train"] & sources["dev"]) and not (sources["train"] & sources["test"])
    assert not (sources["dev"] & sources["test"])
    if len(splits["test"]) < 2000:
        raise ValueError(f"test split has {len(splits['test'])} pairs; raise test_per_mille")
    print({name: (len(rows), len(sources[name])) for name, rows in splits.items()}, flush=True)

    src_tokenizer = train_tokenizer([e for e, _ in splits["train"]], config.src_vocab_size,
                                    config.min_frequency)
    tgt_tokenizer = train_tokenizer([s for _, s in splits["train"]], config.tgt_vocab_size,
                                    config.min_frequency)
    train_src = encode_all(src_tokenizer, [e for e, _ in splits["train"]])
    train_tgt = encode_all(tgt_tokenizer, [s for _, s in splits["train"]])
    train = [(s, t) for s, t in zip(train_src, train_tgt, strict=True)
             if 0 < len(s) <= config.max_train_tokens and 0 < len(t) <= config.max_train_tokens]
    dev_src = encode_all(src_tokenizer, [e for e, _ in splits["dev"]])
    dev_tgt = encode_all(tgt_tokenizer, [s for _, s in splits["dev"]])
    dev = [(s[: config.max_input_tokens], t[: config.max_output_length])
           for s, t in zip(dev_src, dev_tgt, strict=True)]
    print(f"train {len(train)} pairs (of {len(splits['train'])}), dev {len(dev)}, "
          f"vocab src {src_tokenizer.get_vocab_size()} tgt {tgt_tokenizer.get_vocab_size()}", flush=True)

    model_config = TranslateConfig(
        src_vocab_size=src_tokenizer.get_vocab_size(), tgt_vocab_size=tgt_tokenizer.get_vocab_size(),
        embedding_dim=config.embedding_dim, encoder_hidden_size=config.encoder_hidden_size,
        decoder_hidden_size=config.decoder_hidden_size, attention_size=config.attention_size,
        cell=config.cell, attention=config.attention, dropout=config.dropout,
        max_output_length=config.max_output_length,
    )
    model = Translator(model_config)
    if config.init_from:
        previous, previous_meta = load_artifact(config.init_from)
        if (previous_meta["src_tokenizer"], previous_meta["tgt_tokenizer"]) != (
                src_tokenizer.to_str(), tgt_tokenizer.to_str()):
            raise ValueError(f"{config.init_from} was trained with other tokenizers; "
                             "use the same data and vocabulary settings")
        load_weights(model, previous, previous_meta, config.init_from)
    print(f"parameters {sum(p.numel() for p in model.parameters()):,}", flush=True)
    rng = random.Random(config.seed)
    dev_batches = list(train_batches(dev, config.eval_batch_size, random.Random(0)))
    dev_refs = group_references(splits["dev"])
    dev_bleu_sources = list(dev_refs)[: config.dev_bleu_sentences]
    if config.dry_run:
        dev_batches, dev_bleu_sources = dev_batches[:2], dev_bleu_sources[:16]
    budget_seconds = config.max_minutes * 60.0
    # A few seconds past fit's own budget, so an epoch that fit starts always gets its first batch.
    deadline = time.monotonic() + budget_seconds + 5.0

    def loss_fn(model, batch):
        src, src_lengths, tgt_in, tgt_out = batch
        logits = model(src, src_lengths, tgt_in)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1),
                               ignore_index=PAD_ID, label_smoothing=config.label_smoothing)

    def evaluate(model):
        total, count = 0.0, 0
        for src, src_lengths, tgt_in, tgt_out in dev_batches:
            logits = model(src, src_lengths, tgt_in)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1),
                                           ignore_index=PAD_ID, reduction="sum"))
            count += int((tgt_out != PAD_ID).sum())
        hypotheses = translate_texts(model, src_tokenizer, tgt_tokenizer, dev_bleu_sources, 1,
                                     config.max_output_length, 1.0, config.eval_batch_size,
                                     config.max_input_tokens)
        figures = score(hypotheses, [dev_refs[e] for e in dev_bleu_sources])
        return {"dev_loss": total / count, "dev_bleu_greedy": figures["bleu"],
                "dev_chrf_greedy": figures["chrf"]}

    result = fit(
        model, loss_fn,
        lambda epoch: train_batches(train, config.batch_size, rng, deadline),
        evaluate, select="dev_bleu_greedy", epochs=config.epochs, lr=config.lr,
        weight_decay=config.weight_decay, clip_grad_norm=config.clip_grad_norm,
        patience=config.patience, max_steps=1 if config.dry_run else None,
        max_seconds=budget_seconds, desc="translate",
    )
    print(f"best epoch {result.best_epoch}: {result.best_metrics}, {result.seconds:.0f} s", flush=True)

    # Held-out figures on the test split: multi-reference (one hypothesis per English sentence, every
    # translation of it as a reference) and single-reference (one hypothesis per pair).
    test_refs = group_references(splits["test"])
    test_sources = list(test_refs)
    test_pairs = splits["test"]
    if config.dry_run:
        test_sources, test_pairs = test_sources[:16], test_pairs[:16]
    test_metrics: dict[str, float] = {}
    decoded: dict[str, list[str]] = {}
    for name, beam in (("greedy", 1), (f"beam{config.beam_size}", config.beam_size)):
        eval_started = time.monotonic()
        hypotheses = translate_texts(model, src_tokenizer, tgt_tokenizer, test_sources, beam,
                                     config.max_output_length, config.length_penalty,
                                     config.eval_batch_size, config.max_input_tokens)
        seconds = time.monotonic() - eval_started
        decoded[name] = hypotheses
        by_source = dict(zip(test_sources, hypotheses, strict=True))
        multi = score(hypotheses, [test_refs[e] for e in test_sources])
        single = score([by_source[e] for e, _ in test_pairs], [[s] for _, s in test_pairs])
        test_metrics.update({
            f"test_bleu_{name}": multi["bleu"], f"test_chrf_{name}": multi["chrf"],
            f"test_bleu_{name}_single_ref": single["bleu"], f"test_chrf_{name}_single_ref": single["chrf"],
            f"test_decode_seconds_{name}": round(seconds, 1),
        })
        print(name, multi, "single-ref", single, f"{seconds:.0f} s", flush=True)
    sample_rng = random.Random(0)
    sample_indices = sorted(sample_rng.sample(range(len(test_sources)), min(10, len(test_sources))))
    beam_name = f"beam{config.beam_size}"
    samples = [{"source": test_sources[i], "references": test_refs[test_sources[i]],
                "greedy": decoded["greedy"][i], beam_name: decoded[beam_name][i]} for i in sample_indices]
    love_dogs = {
        "source": SAMPLE_SOURCE,
        "greedy": translate_texts(model, src_tokenizer, tgt_tokenizer, [SAMPLE_SOURCE], 1,
                                  config.max_output_length, 1.0, 1, config.max_input_tokens)[0],
        beam_name: translate_texts(model, src_tokenizer, tgt_tokenizer, [SAMPLE_SOURCE], config.beam_size,
                                   config.max_output_length, config.length_penalty, 1,
                                   config.max_input_tokens)[0],
    }
    print(json.dumps(samples, ensure_ascii=False, indent=1), json.dumps(love_dogs, ensure_ascii=False),
          flush=True)

    metadata = {
        "task": "translate",
        "cell": config.cell,
        "attention": config.attention,
        "source_language": "en",
        "target_language": "es",
        "src_tokenizer": src_tokenizer.to_str(),
        "tgt_tokenizer": tgt_tokenizer.to_str(),
        "special_tokens": list(SPECIAL_TOKENS),
        "max_input_tokens": config.max_input_tokens,
        "max_output_length": config.max_output_length,
        "default_length_penalty": config.length_penalty,
        "model_config": model_config.to_dict(),
        "train_config": to_dict(config),
        "data": {
            "path": Path(config.data_path).name, "member": config.member,
            "sha256": sha256_file(config.data_path),
            "split": f"sha256(English) mod 1000: test < {config.test_per_mille}, dev < "
                     f"{config.test_per_mille + config.dev_per_mille}, else train",
            "pairs": {name: len(rows) for name, rows in splits.items()},
            "english_sentences": {name: len(s) for name, s in sources.items()},
            "train_pairs_used": len(train),
            "attribution": "www.manythings.org/anki and tatoeba.org (CC BY 2.0 FR)",
        },
        "metrics": {**result.best_metrics, **test_metrics, "best_epoch": result.best_epoch,
                    "epochs_run": len(result.history), "train_seconds": round(result.seconds, 1),
                    "test_sentences": len(test_sources), "test_pairs": len(test_pairs)},
        "samples": samples,
        "sample_i_love_dogs": love_dogs,
        "history": result.history,
        "total_seconds": round(time.monotonic() - started, 1),
        "dry_run": config.dry_run,
    }
    out_dir = Path(config.out_dir)
    # Reload the artifact and check that it decodes exactly like the eager model before anything serves it.
    full, scripted, loaded = export_and_reload(model, out_dir, metadata, config)
    src, src_lengths, _, _ = dev_batches[0]
    with torch.inference_mode():
        for got, want in zip(scripted.beam_search(src, src_lengths, 4, 30, 1.0, True),
                             model.beam_search(src, src_lengths, 4, 30, 1.0, True), strict=True):
            torch.testing.assert_close(got, want)
    assert loaded["tgt_tokenizer"] == tgt_tokenizer.to_str()
    if config.register:
        from training.registry import register

        print(f"registered {register('translate', out_dir)}", flush=True)
    return full


if __name__ == "__main__":
    main(sys.argv[1:])
