"""Re-exports a committed artifact with the current model code, once it is proven to answer the same.

A change to a model family's module code (not to its weights) leaves committed artifacts carrying the
old TorchScript. This rebuilds the eager module from the artifact's own ``model_config``, copies the
old scripted module's weights into it (renaming state_dict keys where the module tree changed), scripts
it, and compares old and new on real inputs: forecast windows, one sequence pass and session steps
over the TSLA series; translate greedy (with attention) and beam search on the test sentences;
caption greedy and beam search on the test scenes. With ``--write`` and every difference zero, it
replaces ``model.pt`` (the embedded metadata byte for byte as before) and the sha256 in
``metadata.json``; nothing else in the metadata changes.

    python -m training.reexport models/artifacts/translate models/artifacts/caption [--write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.artifact import METADATA_FILE, MODEL_FILE, load_artifact, save_artifact, sha256_file
from models.caption import CaptionConfig, Captioner
from models.forecast import ForecastConfig, ForecastRNN
from models.rnn import pad_sequences
from models.translate import PAD_ID, TranslateConfig, Translator
from training.export import script

DATA = Path(__file__).resolve().parent / "data"

# Old state_dict key prefix -> new, per task, for module-tree changes. Issue 14 (one stateful-RNN
# convention, models/rnn.py) kept every key (encoder.rnn, decoder.rnn, recurrence.rnn), so none yet.
KEY_RENAMES: dict[str, dict[str, str]] = {"forecast": {}, "translate": {}, "caption": {}}

Differences = dict[str, float]


def _config(config_type: type, raw: dict[str, Any]) -> Any:
    """The frozen config from its JSON form (JSON lists back to the tuples the dataclass declares)."""
    return config_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "forecast": lambda raw: ForecastRNN(_config(ForecastConfig, raw)),
    "translate": lambda raw: Translator(_config(TranslateConfig, raw)),
    "caption": lambda raw: Captioner(_config(CaptionConfig, raw)),
}


def rebuild(task: str, old: torch.jit.ScriptModule, metadata: dict[str, Any]) -> nn.Module:
    """The current eager module of ``task`` holding ``old``'s weights, in eval mode.

    Every persistent key must map one to one; non-persistent buffers (fixed tables each module
    builds itself) are not in the eager state_dict and are skipped.
    """
    model = BUILDERS[task](metadata["model_config"])
    renames = KEY_RENAMES[task]

    def renamed(key: str) -> str:
        for before, after in renames.items():
            if key.startswith(before):
                return after + key[len(before):]
        return key

    wanted = model.state_dict().keys()
    weights = {renamed(k): v for k, v in old.state_dict().items()}
    model.load_state_dict({k: v for k, v in weights.items() if k in wanted}, strict=True)
    own_tables = {name for name, _ in model.named_buffers()} - set(wanted)  # non-persistent buffers
    if unexpected := sorted(set(weights) - set(wanted) - own_tables):
        raise ValueError(f"{task}: old weights {unexpected} have no place in the new module; "
                         "add a KEY_RENAMES entry")
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype in (torch.long, torch.bool):
        return float((a != b).sum())  # count of differing entries: tokens must match exactly
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _record(out: Differences, name: str, old: Any, new: Any) -> None:
    if isinstance(old, torch.Tensor):
        out[name] = max(out.get(name, 0.0), _max_diff(old, new))
    else:
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            _record(out, f"{name}[{index}]", a, b)


@torch.inference_mode()
def compare_forecast(old, new, metadata: dict[str, Any]) -> Differences:
    from training.forecast_data import feature_matrix, read_yahoo_csv, windows

    features = feature_matrix(read_yahoo_csv(DATA / "stock" / "TSLA.csv"))  # (N, F); row 0 NaN
    window = int(metadata["window"])
    out: Differences = {}
    origins = np.arange(window, len(features))  # every window of the series, oldest first
    for start in range(0, len(origins), 512):
        x = torch.from_numpy(windows(features, origins[start:start + 512], window))  # (B, L, F)
        _record(out, "windows", old(x), new(x))
    series = torch.from_numpy(features[1:]).unsqueeze(0)  # (1, N-1, F)
    _record(out, "sequence", old.sequence(series, old.initial_state(1)),
            new.sequence(series, new.initial_state(1)))
    # Sessions: eight streams warmed on different histories, then stepped together bar by bar; a
    # state the old model exported as a flat list (services/forecast.py) is imported by the new one.
    layers, hidden = metadata["state_shape"]
    starts = [1 + 400 * i for i in range(8)]
    states = [old.sequence(series[:, s - 1:s + 199], old.initial_state(1))[1] for s in starts]
    exported = [state.reshape(-1).tolist() for state in states]
    old_state = torch.cat(states, dim=1)  # (S*L, 8, H)
    new_state = torch.cat([torch.tensor(v).view(layers, 1, hidden) for v in exported], dim=1)
    _record(out, "session_import", old_state, new_state)
    for t in range(200, 700):
        bars = torch.stack([series[0, s - 1 + t] for s in starts])  # (8, F)
        old_q, old_state = old.step(bars, old_state)
        new_q, new_state = new.step(bars, new_state)
        _record(out, "session_steps", (old_q, old_state), (new_q, new_state))
    return out


@torch.inference_mode()
def compare_translate(old, new, metadata: dict[str, Any]) -> Differences:
    from tokenizers import Tokenizer

    from training.train_translate import read_pairs, split_of

    config = metadata["train_config"]
    pairs = read_pairs(str(DATA / "translation" / "spa-eng.zip"), metadata["data"]["member"])
    english = list(dict.fromkeys(e for e, _ in pairs
                                 if split_of(e, config["test_per_mille"], config["dev_per_mille"]) == "test"))
    source = Tokenizer.from_str(metadata["src_tokenizer"])
    limit = int(metadata["max_input_tokens"])
    encoded = [e.ids[:limit] for e in source.encode_batch(english)]
    out: Differences = {"sentences_greedy": float(len(encoded))}
    beam_sentences = encoded[:600]
    out["sentences_beam"] = float(len(beam_sentences))
    for start in range(0, len(encoded), 64):
        src, lengths = pad_sequences(encoded[start:start + 64], PAD_ID)
        _record(out, "greedy", old.greedy(src, lengths, 80, True), new.greedy(src, lengths, 80, True))
    for start in range(0, len(beam_sentences), 32):
        src, lengths = pad_sequences(beam_sentences[start:start + 32], PAD_ID)
        _record(out, "beam4", old.beam_search(src, lengths, 4, 80, 1.0, True),
                new.beam_search(src, lengths, 4, 80, 1.0, True))
    return out


@torch.inference_mode()
def compare_caption(old, new, metadata: dict[str, Any]) -> Differences:
    from training.train_caption import normalise, scene_split

    mean, std = metadata["normalisation"]["mean"], metadata["normalisation"]["std"]
    max_length = int(metadata["max_length"])
    out: Differences = {}
    for split in ("test_fresh", "test_unseen"):
        pixels = scene_split(1000, split).pixels
        for start in range(0, len(pixels), 250):
            images = normalise(pixels[start:start + 250], mean, std)
            # Mixed per-row limits, so rows stop at different steps.
            limits = torch.tensor([max_length - (i % 4) * 7 for i in range(len(images))])
            _record(out, "greedy", old.greedy(images, limits), new.greedy(images, limits))
            _record(out, "beam3", old.beam_search(images, limits, 3), new.beam_search(images, limits, 3))
    return out


COMPARISONS = {"forecast": compare_forecast, "translate": compare_translate, "caption": compare_caption}


def reexport(directory: Path, write: bool) -> Differences:
    """Compares the artifact in ``directory`` with its re-export; with ``write`` and no difference,
    replaces it. Returns the differences (max abs for floats, differing entries for tokens)."""
    task = directory.name
    old, metadata = load_artifact(directory)
    with tempfile.TemporaryDirectory() as scratch:
        # save_artifact embeds the same metadata and writes it beside with the new sha256; the
        # old metadata.json must be exactly that but for the sha256.
        written = save_artifact(script(rebuild(task, old, metadata)), scratch, metadata)
        before = json.loads((directory / METADATA_FILE).read_text())
        if {**before, "sha256": written["sha256"]} != written:
            raise SystemExit(f"{directory}: metadata.json is not the embedded metadata plus sha256/file")
        new, new_metadata = load_artifact(scratch)
        assert new_metadata == metadata
        torch.manual_seed(0)
        differences = COMPARISONS[task](old, new, metadata)
        if write:
            counted = {k: v for k, v in differences.items() if not k.startswith("sentences_")}
            if any(v != 0.0 for v in counted.values()):
                raise SystemExit(f"{directory}: old and new differ ({counted}); not replacing it")
            for name in (MODEL_FILE, METADATA_FILE):
                shutil.copyfile(Path(scratch) / name, directory / name)
            load_artifact(directory)  # checksum-verified, as serving loads it
    return differences


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--write", action="store_true", help="replace the artifact when nothing differs")
    args = parser.parse_args(argv)
    for directory in args.directories:
        before = sha256_file(directory / MODEL_FILE)
        differences = reexport(directory, args.write)
        after = sha256_file(directory / MODEL_FILE)
        print(json.dumps({"artifact": str(directory), "sha256_before": before, "sha256_after": after,
                          "differences": differences}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
