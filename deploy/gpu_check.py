"""GPU check: every model on cuda against cpu, with nothing but torch and the artifacts.

For each artifact (models/artifacts/<name>/model.pt + metadata.json) it runs the model's forward pass on
the same deterministic inputs on cpu and on the target device, checks that the outputs agree within
tolerance, and prints items/s per model and batch size on each device with the ratio. It needs neither
this project's virtual environment nor BentoML: any Python >= 3.10 with a CUDA build of torch will do
(written for Python 3.12 + torch 2.11 as well as the project's 3.11 + 2.13).

A TorchScript file saved by a newer torch may not load in an older one. Then each model is rebuilt
from its code (models/<name>.py, pure nn.Modules) and its weights: run ``--export-weights`` once where
the artifacts load (this checkout) to write weights.pt beside each model.pt, and copy models/ with them.

    python deploy/gpu_check.py                       # cuda vs cpu; exit 2 without a usable GPU
    python deploy/gpu_check.py --export-weights      # writes models/artifacts/*/weights.pt
    python deploy/gpu_check.py --target cpu          # checks the script itself on a CPU machine
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
# Artifact name -> (module, nn.Module class, config dataclass) used when TorchScript does not load.
FAMILIES = {"sentiment": ("models.sentiment", "SentimentRNN", "SentimentConfig"),
            "forecast": ("models.forecast", "ForecastRNN", "ForecastConfig"),
            "translate": ("models.translate", "Translator", "TranslateConfig"),
            "caption": ("models.caption", "Captioner", "CaptionConfig")}
SEQUENCE_LENGTH = 24  # tokens per text / caption prefix in the generated inputs


def load(directory: Path, force_rebuild: bool = False) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """(model on cpu in eval mode, metadata, how it was loaded)."""
    metadata = json.loads((directory / "metadata.json").read_text())
    if not force_rebuild:
        try:
            model = torch.jit.load(str(directory / "model.pt"), map_location="cpu")
            return model.eval(), metadata, "torchscript"
        except Exception as exc:  # e.g. a file format newer than this torch
            print(f"{directory.name}: TorchScript did not load ({type(exc).__name__}: {exc}); rebuilding")
    weights = directory / "weights.pt"
    if not weights.is_file():
        raise SystemExit(f"{directory.name}: no {weights}: run `python deploy/gpu_check.py --export-weights` "
                         "where the artifacts load, and copy the weights and models/ here")
    sys.path.insert(0, str(ROOT))
    module_name, class_name, config_name = FAMILIES[directory.name]
    module = importlib.import_module(module_name)
    model = getattr(module, class_name)(getattr(module, config_name)(**metadata["model_config"]))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), metadata, "rebuilt from models/ + weights.pt"


def inputs(name: str, metadata: dict[str, Any], batch_size: int) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs of the model's forward (lengths stay on cpu, where pack_padded_sequence
    wants them)."""
    generator = torch.Generator().manual_seed(batch_size)
    config = metadata["model_config"]
    lengths = torch.randint(SEQUENCE_LENGTH // 2, SEQUENCE_LENGTH + 1, (batch_size,), generator=generator)
    lengths[0] = SEQUENCE_LENGTH
    shape = (batch_size, SEQUENCE_LENGTH)
    if name == "sentiment":
        return torch.randint(1, config["vocab_size"], shape, generator=generator), lengths
    if name == "forecast":
        return (torch.randn(batch_size, int(metadata["window"]), config["input_size"], generator=generator),)
    if name == "translate":
        source = torch.randint(4, config["src_vocab_size"], shape, generator=generator)
        target = torch.randint(4, config["tgt_vocab_size"], shape, generator=generator)
        return source, lengths, target
    if name == "caption":
        size = config["image_size"]
        images = torch.rand(batch_size, 3, size, size, generator=generator)
        return images, torch.randint(1, config["vocab_size"], shape, generator=generator)
    raise SystemExit(f"no inputs for model {name}: add it to deploy/gpu_check.py")


def on(device: str, tensors: tuple[torch.Tensor, ...], name: str) -> tuple[torch.Tensor, ...]:
    moved = [t.to(device) for t in tensors]
    if name in ("sentiment", "translate"):
        moved[1] = tensors[1]  # lengths
    return tuple(moved)


def rate(model: torch.nn.Module, args: tuple[torch.Tensor, ...], device: str, batch_size: int,
         seconds: float) -> float:
    """Items per second of the forward pass, after one warm-up call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        model(*args)
        sync()
        calls, started = 0, time.perf_counter()
        while True:
            model(*args)
            calls += 1
            sync()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return calls * batch_size / elapsed


def check(artifacts: Path, target: str, batch_sizes: list[int], seconds: float, rtol: float, atol: float,
          force_rebuild: bool) -> int:
    failures = 0
    rows = []
    for directory in sorted(p for p in artifacts.iterdir() if (p / "model.pt").is_file()):
        name = directory.name
        model, metadata, how = load(directory, force_rebuild)
        accelerated, _, _ = load(directory, force_rebuild)
        accelerated = accelerated.to(target)
        print(f"{name}: {how}")
        for batch_size in batch_sizes:
            args = inputs(name, metadata, batch_size)
            with torch.inference_mode():
                expected = model(*args)
                got = accelerated(*on(target, args, name)).cpu()
            difference = (expected - got).abs().max().item()
            same = torch.allclose(expected, got, rtol=rtol, atol=atol)
            failures += not same
            cpu_rate = rate(model, args, "cpu", batch_size, seconds)
            target_rate = rate(accelerated, on(target, args, name), target, batch_size, seconds)
            rows.append((name, batch_size, difference, "ok" if same else "DIFFERS", cpu_rate, target_rate))
    print(f"\n{'model':<10}{'batch':>6}{'max |diff|':>12}{'':>9}{'cpu items/s':>14}"
          f"{target + ' items/s':>16}{'ratio':>8}")
    for name, batch_size, difference, verdict, cpu_rate, target_rate in rows:
        print(f"{name:<10}{batch_size:>6}{difference:>12.2e}{verdict:>9}{cpu_rate:>14.1f}{target_rate:>16.1f}"
              f"{target_rate / max(cpu_rate, 1e-9):>8.2f}")
    print(f"\ntorch {torch.__version__}, cuda {torch.version.cuda}, rtol {rtol}, atol {atol}: "
          + ("GPU CHECK OK" if not failures else f"{failures} output(s) differ"))
    return 1 if failures else 0


def export_weights(artifacts: Path) -> None:
    for directory in sorted(p for p in artifacts.iterdir() if (p / "model.pt").is_file()):
        model = torch.jit.load(str(directory / "model.pt"), map_location="cpu")
        torch.save(model.state_dict(), directory / "weights.pt")
        print(f"{directory / 'weights.pt'}: {len(model.state_dict())} tensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "models" / "artifacts")
    parser.add_argument("--target", default="cuda", help="device compared against cpu (default cuda)")
    parser.add_argument("--batch-sizes", default="1,8,64,256")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per model, batch size and device")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--force-rebuild", action="store_true", help="skip TorchScript, rebuild from models/")
    parser.add_argument("--export-weights", action="store_true")
    args = parser.parse_args(argv)
    if args.export_weights:
        export_weights(args.artifacts)
        return 0
    if args.target.startswith("cuda"):
        if torch.version.cuda is None or not torch.cuda.is_available():
            print(f"gpu_check: no usable GPU (torch {torch.__version__}, torch.version.cuda "
                  f"{torch.version.cuda!r}, cuda available {torch.cuda.is_available()}); nothing checked",
                  file=sys.stderr)
            return 2
        print(f"device: {torch.cuda.get_device_name(0)}")
    torch.manual_seed(0)
    return check(args.artifacts, args.target, [int(b) for b in args.batch_sizes.split(",")], args.seconds,
                 args.rtol, args.atol, args.force_rebuild)


if __name__ == "__main__":
    sys.exit(main())
