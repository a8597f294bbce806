"""Vanishing and exploding gradients, measured: tanh RNN vs GRU vs LSTM on a copy task.

The source notes say a vanilla RNN applies the same tanh step at every time step, so the gradient that
reaches an early step is a product of T Jacobians and shrinks (or grows) geometrically; gated cells
(LSTM, GRU) and gradient clipping are the remedies (Bengio et al. 1994; Hochreiter & Schmidhuber 1997;
Pascanu et al. 2013). This script measures that instead of asserting it:

1. trains each cell, at a matched parameter count, on a copy task that needs memory over T steps, for
   every T in ``lengths``, and reports held-out accuracy against T;
2. measures ||dL/dh_t|| against the distance from the loss (at initialisation and after training) by
   running the cell one step at a time and keeping the gradient of every per-step hidden state;
3. trains one cell with and without gradient clipping from the same initial weights and batches, and
   logs the pre-clip gradient norm at every step.

It writes PNG charts, ``results.md`` and ``results.json`` to ``out_dir``.

    python -m training.gradient_study                   # full study, a few minutes on one CPU thread
    python -m training.gradient_study --quick           # the seconds-long version the unit test runs
    python -m training.gradient_study --lengths '[10, 100]' --train-steps 800
    python -m training.gradient_study --replot training/reports/gradients/results.json  # charts only

The task (the copy task of Hochreiter & Schmidhuber 1997 and Arjovsky et al. 2016, with one symbol to
copy): step 0 shows one of ``symbols`` symbols, steps 1..T-2 show a blank, step T-1 shows a "recall"
cue, and the model must name the first symbol from its last hidden state (many-to-one). Chance accuracy
is 1/symbols. The symbol is T-1 steps away from the loss, so the gradient that teaches the cell to
store it must cross T-1 recurrent steps.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.rnn import CELLS, make_rnn
from training.config import parse_config, to_dict
from training.loop import seed_everything

# Weight matrices per cell: h = tanh(...) has one, GRU three (reset, update, candidate), LSTM four
# (input, forget, cell, output gates). Used to match parameter counts across cells.
GATES = {"rnn_tanh": 1, "gru": 3, "lstm": 4}


@dataclass(frozen=True)
class GradientStudyConfig:
    out_dir: str = "training/reports/gradients"
    cells: tuple[str, ...] = CELLS
    lengths: tuple[int, ...] = (10, 50, 200)
    symbols: int = 8
    distractors: bool = True
    # Recurrent layer + linear read-out parameters per model; each cell gets the hidden size that comes
    # closest (matched parameter count, not matched hidden size: an LSTM of the same width has 4x the
    # weights of a tanh RNN).
    param_budget: int = 12_000
    # Initial bias of the LSTM forget gate and the GRU update gate. None keeps PyTorch's default
    # (uniform in +-1/sqrt(hidden_size): the gate starts half shut, so at initialisation the gated cells'
    # memory decays like 0.5^T too). 3.0 starts them ~95% open, as the forget-gate bias advice of Gers
    # et al. 2000 and Jozefowicz et al. 2015 and the chrono initialisation of Tallec & Ollivier 2018 do;
    # measured here, 1.0 was not enough for either gated cell to learn T = 50 in 400 steps.
    gate_bias: float | None = 3.0
    # Chrono initialisation instead of ``gate_bias``: per-unit biases log(U(1, T - 1)) for each T.
    chrono: bool = False
    train_steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    clip_grad_norm: float = 1.0
    eval_examples: int = 1000
    probe_examples: int = 64
    # The clipping experiment: one cell and length, trained twice from the same weights and batches,
    # once with clipping at ``clip_grad_norm`` and once without.
    clip_cell: str = "rnn_tanh"
    clip_length: int = 50
    clip_steps: int = 300
    clip_optimizer: str = "adamw"
    clip_lr: float = 1e-2
    seed: int = 1234
    threads: int = 1
    # Seconds-scale run for the unit test: short lengths, few steps, small budget.
    quick: bool = False
    # One optimizer step per run; still measures and writes every output.
    dry_run: bool = False
    # Redraw the charts and table from an earlier run's results.json instead of training.
    replot: str = ""

    def __post_init__(self) -> None:
        for cell in (*self.cells, self.clip_cell):
            if cell not in CELLS:
                raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        if not self.lengths or min(self.lengths) < 3 or self.clip_length < 3:
            raise ValueError(f"every length needs at least 3 steps (symbol, blank, cue), got "
                             f"{self.lengths} and clip_length={self.clip_length}")
        if self.clip_optimizer not in ("adamw", "sgd"):
            raise ValueError(f"clip_optimizer must be adamw or sgd, got {self.clip_optimizer!r}")
        if self.symbols < 2:
            raise ValueError(f"symbols must be at least 2, got {self.symbols}")


QUICK = dict(lengths=(10, 50), param_budget=3_000, train_steps=40, batch_size=32, eval_examples=256,
             probe_examples=16, clip_length=30, clip_steps=30)


class CopyModel(nn.Module):
    """One recurrent layer from ``make_rnn`` and a linear read-out of the last hidden state."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, symbols: int,
                 gate_bias: float | None = None, chrono_length: int | None = None) -> None:
        super().__init__()
        self.cell = cell
        self.rnn = make_rnn(cell, input_size, hidden_size)
        self.readout = nn.Linear(hidden_size, symbols)
        if cell == "rnn_tanh" or (gate_bias is None and chrono_length is None):
            return
        # Bias the "keep the old state" gate open: the LSTM forget gate (Gers et al. 2000;
        # Jozefowicz et al. 2015) or the GRU update gate z in h = (1 - z) * n + z * h_prev.
        # PyTorch orders LSTM gates (i, f, g, o) and GRU gates (r, z, n) in blocks of hidden_size.
        with torch.no_grad():
            keep = slice(hidden_size, 2 * hidden_size)
            if chrono_length is not None:
                # Chrono initialisation (Tallec & Ollivier 2018): b = log(U(1, T - 1)) spreads the
                # units' memory spans up to the task's T; the LSTM input gate gets -b.
                bias = torch.log(torch.empty(hidden_size).uniform_(1, max(chrono_length - 1, 2)))
            else:
                bias = torch.full((hidden_size,), float(gate_bias))
            self.rnn.bias_ih_l0[keep] = bias
            self.rnn.bias_hh_l0[keep] = 0.0
            if chrono_length is not None and cell == "lstm":
                self.rnn.bias_ih_l0[:hidden_size] = -bias
                self.rnn.bias_hh_l0[:hidden_size] = 0.0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Shape:
        inputs: (B, T, I) float; output: logits (B, symbols) from the hidden state at step T-1.
        """
        outputs, _ = self.rnn(inputs)  # (B, T, H)
        return self.readout(outputs[:, -1])  # (B, symbols)

    def forward_stepwise(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the same weights one step at a time and returns every hidden state as its own tensor.

        The fused layer's output sequence only receives the gradient that flows into it directly (zero
        before the last step here); the total derivative dL/dh_t, through all later steps, needs each
        h_t to be a leaf of the step-by-step graph with ``retain_grad``.

        Shape:
            inputs: (B, T, I); output: logits (B, symbols) and T hidden states of shape (B, H).
        """
        state: Any = None
        hidden: list[torch.Tensor] = []
        for t in range(inputs.shape[1]):
            output, state = self.rnn(inputs[:, t : t + 1], state)  # output (B, 1, H)
            h_t = state[0] if isinstance(state, tuple) else state  # (1, B, H)
            h_t.retain_grad()
            hidden.append(h_t)
            del output
        return self.readout(hidden[-1][0]), hidden


def param_count(cell: str, input_size: int, hidden_size: int, symbols: int) -> int:
    recurrent = GATES[cell] * hidden_size * (input_size + hidden_size + 2)  # W_ih, W_hh, b_ih, b_hh
    return recurrent + hidden_size * symbols + symbols


def matched_hidden_size(cell: str, input_size: int, symbols: int, budget: int) -> int:
    """The hidden size whose parameter count is closest to ``budget``."""
    return min(range(1, 1024), key=lambda h: abs(param_count(cell, input_size, h, symbols) - budget))


def copy_batch(batch_size: int, length: int, symbols: int, generator: torch.Generator,
               distractors: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy-task batch: the marked symbol at step 0, then distractors (or blanks), then the cue.

    Channels: ``symbols`` one-hot symbol channels, a "remember this" marker (set at step 0) and a
    "recall now" cue (set at step T-1). With ``distractors`` every later step shows a random symbol in
    the same channels, so the cell must learn to ignore input unless the marker is set (an input gate);
    without, those steps are all-zero blanks.

    Shape:
        output: inputs (B, T, symbols + 2) float, targets (B,) int64 in [0, symbols).
    """
    targets = torch.randint(symbols, (batch_size,), generator=generator)
    sequence = torch.randint(symbols, (batch_size, length), generator=generator)  # (B, T)
    sequence[:, 0] = targets
    inputs = torch.zeros(batch_size, length, symbols + 2)  # (B, T, symbols + 2)
    inputs[:, :, :symbols] = F.one_hot(sequence, symbols).float()
    if not distractors:
        inputs[:, 1:, :symbols] = 0.0
    inputs[:, 0, symbols] = 1.0  # remember this
    inputs[:, -1, symbols + 1] = 1.0  # recall now
    return inputs, targets


def gradient_profile(model: CopyModel, inputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Mean over examples of ||dl_i/dh_t|| for every step t, in float64 so nothing underflows to 0.

    ``l_i`` is one example's cross-entropy (the loss is summed, so each example's hidden states get
    its own gradient, not one divided by the batch size).

    Shape:
        inputs: (B, T, I), targets: (B,); output: T floats, index t = step t (distance T-1-t).
    """
    probe = copy.deepcopy(model).double()
    logits, hidden = probe.forward_stepwise(inputs.double())
    F.cross_entropy(logits, targets, reduction="sum").backward()
    return [float(h.grad[0].norm(dim=-1).mean()) for h in hidden]  # h.grad: (1, B, H)


def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = model(inputs)
    return {"accuracy": float((logits.argmax(dim=1) == targets).float().mean()),
            "loss": float(F.cross_entropy(logits, targets))}


def train(model: nn.Module, config: GradientStudyConfig, length: int, steps: int, lr: float,
          clip: float | None, data_seed: int, optimizer_name: str = "adamw") -> dict[str, list[float]]:
    """AdamW (or SGD) on fresh batches every step, as in ``training.loop.fit``, logging every step.

    ``fit`` logs per-epoch summaries; this study needs the pre-clip gradient norm of every step, and
    the data is infinite, so it keeps its own short loop with the same optimizer and clipping.
    """
    generator = torch.Generator().manual_seed(data_seed)
    if optimizer_name == "sgd":  # plain SGD: a gradient spike becomes a parameter jump of the same size
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    grad_norms: list[float] = []
    model.train()
    for _ in range(steps):
        inputs, targets = copy_batch(config.batch_size, length, config.symbols, generator,
                                     config.distractors)
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else math.inf)
        optimizer.step()
        losses.append(loss.item())
        grad_norms.append(float(norm))
    model.eval()
    return {"train_loss": losses, "grad_norm": grad_norms}


def ratio(profile: list[float]) -> float:
    """||dL/dh_first|| / ||dL/dh_last||: 1 means no decay over the sequence, 1e-10 means vanished."""
    return profile[0] / profile[-1] if profile[-1] > 0 else math.nan


def run_length_sweep(config: GradientStudyConfig, steps: int) -> list[dict[str, Any]]:
    input_size = config.symbols + 2
    runs = []
    for length in config.lengths:
        eval_inputs, eval_targets = copy_batch(config.eval_examples, length, config.symbols,
                                               torch.Generator().manual_seed(config.seed + 1),
                                               config.distractors)
        probe = slice(0, config.probe_examples)
        probe_inputs, probe_targets = eval_inputs[probe], eval_targets[probe]
        for cell in config.cells:
            hidden_size = matched_hidden_size(cell, input_size, config.symbols, config.param_budget)
            seed_everything(config.seed)
            model = CopyModel(cell, input_size, hidden_size, config.symbols, config.gate_bias,
                              length if config.chrono else None)
            params = sum(p.numel() for p in model.parameters())
            assert params == param_count(cell, input_size, hidden_size, config.symbols)
            profile_init = gradient_profile(model, probe_inputs, probe_targets)
            started = time.perf_counter()
            log = train(model, config, length, steps, config.lr, config.clip_grad_norm,
                        data_seed=config.seed + 2)
            seconds = time.perf_counter() - started
            profile_trained = gradient_profile(model, probe_inputs, probe_targets)
            metrics = evaluate(model, eval_inputs, eval_targets)
            run = {
                "cell": cell, "length": length, "hidden_size": hidden_size, "params": params,
                "steps": steps, "train_seconds": round(seconds, 2), **metrics,
                "ratio_init": ratio(profile_init), "ratio_trained": ratio(profile_trained),
                "profile_init": profile_init, "profile_trained": profile_trained, **log,
            }
            print(f"{cell:8s} T={length:4d} H={hidden_size:3d} params={params} "
                  f"acc={metrics['accuracy']:.3f} loss={metrics['loss']:.3f} "
                  f"ratio_init={run['ratio_init']:.3g} ratio_trained={run['ratio_trained']:.3g} "
                  f"{seconds:.1f}s", flush=True)
            runs.append(run)
    return runs


def run_clipping(config: GradientStudyConfig, steps: int) -> dict[str, Any]:
    input_size = config.symbols + 2
    hidden_size = matched_hidden_size(config.clip_cell, input_size, config.symbols, config.param_budget)
    seed_everything(config.seed)
    initial = CopyModel(config.clip_cell, input_size, hidden_size, config.symbols, config.gate_bias,
                        config.clip_length if config.chrono else None)
    eval_inputs, eval_targets = copy_batch(config.eval_examples, config.clip_length, config.symbols,
                                           torch.Generator().manual_seed(config.seed + 1),
                                           config.distractors)
    out: dict[str, Any] = {"cell": config.clip_cell, "length": config.clip_length, "lr": config.clip_lr,
                           "optimizer": config.clip_optimizer, "max_norm": config.clip_grad_norm,
                           "hidden_size": hidden_size}
    for name, clip in (("clipped", config.clip_grad_norm), ("unclipped", None)):
        model = copy.deepcopy(initial)
        log = train(model, config, config.clip_length, steps, config.clip_lr, clip,
                    data_seed=config.seed + 3, optimizer_name=config.clip_optimizer)
        norms = np.asarray(log["grad_norm"])
        out[name] = {**log, **evaluate(model, eval_inputs, eval_targets),
                     "grad_norm_median": float(np.median(norms)), "grad_norm_max": float(norms.max()),
                     "finite": bool(np.isfinite(norms).all() and np.isfinite(log["train_loss"]).all())}
        print(f"clip {name:9s} {config.clip_cell} T={config.clip_length} lr={config.clip_lr} "
              f"acc={out[name]['accuracy']:.3f} median|g|={out[name]['grad_norm_median']:.3g} "
              f"max|g|={out[name]['grad_norm_max']:.3g}", flush=True)
    return out


def plot(results: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs, config = results["runs"], results["config"]
    colors = {"rnn_tanh": "tab:red", "gru": "tab:green", "lstm": "tab:blue"}
    lengths = list(config["lengths"])
    files = []

    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for run in (r for r in runs if r["length"] == length):
            distance = np.arange(length)[::-1]  # step t is T-1-t steps from the loss
            for key, style, label in (("profile_init", "-", "init"), ("profile_trained", "--", "trained")):
                ax.semilogy(distance, run[key], style, color=colors[run["cell"]],
                            label=f"{run['cell']} ({label})")
        ax.set_title(f"T = {length}")
        ax.set_xlabel("distance from the loss (steps)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("mean ||dL/dh_t||")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Gradient reaching each hidden state, copy task (matched parameter count)")
    fig.tight_layout()
    fig.savefig(out_dir / "gradient_vs_distance.png", dpi=110)
    files.append("gradient_vs_distance.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for cell in config["cells"]:
        cell_runs = sorted((r for r in runs if r["cell"] == cell), key=lambda r: r["length"])
        xs = [r["length"] for r in cell_runs]
        axes[0].plot(xs, [r["accuracy"] for r in cell_runs], "o-", color=colors[cell], label=cell)
        axes[1].semilogy(xs, [r["ratio_init"] for r in cell_runs], "o-", color=colors[cell],
                         label=f"{cell} (init)")
        axes[1].semilogy(xs, [r["ratio_trained"] for r in cell_runs], "s--", color=colors[cell],
                         label=f"{cell} (trained)")
    axes[0].axhline(1 / config["symbols"], color="gray", ls=":", label="chance")
    axes[0].set(xscale="log", xlabel="T (steps between symbol and loss)", ylabel="held-out accuracy",
                ylim=(0, 1.05), title=f"Accuracy after {config['train_steps']} steps")
    axes[1].set(xscale="log", xlabel="T", ylabel="||dL/dh_first|| / ||dL/dh_last||",
                title="Gradient ratio, first/last step")
    for ax in axes:
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_length.png", dpi=110)
    files.append("accuracy_vs_length.png")
    plt.close(fig)

    clip = results["clipping"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, color in (("unclipped", "tab:red"), ("clipped", "tab:blue")):
        axes[0].semilogy(clip[name]["grad_norm"], color=color, lw=0.8, label=name)
        axes[1].plot(clip[name]["train_loss"], color=color, lw=0.8, label=name)
    axes[0].axhline(clip["max_norm"], color="gray", ls=":", label=f"max_norm={clip['max_norm']}")
    axes[0].set(xlabel="optimizer step", ylabel="global gradient norm (before clipping)")
    axes[1].set(xlabel="optimizer step", ylabel="training loss")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{clip['cell']}, T = {clip['length']}, {clip['optimizer']} lr = {clip['lr']}: "
                 "with and without clipping")
    fig.tight_layout()
    fig.savefig(out_dir / "clipping.png", dpi=110)
    files.append("clipping.png")
    plt.close(fig)
    return files


def table(results: dict[str, Any]) -> str:
    config, clip = results["config"], results["clipping"]
    lines = [
        f"Copy task, {config['symbols']} symbols (chance accuracy {1 / config['symbols']:.3f}), "
        f"{config['train_steps']} AdamW steps of {config['batch_size']} sequences, lr {config['lr']}, "
        f"clipping at {config['clip_grad_norm']}, parameter budget {config['param_budget']}, "
        f"seed {config['seed']}. Ratio = mean ||dL/dh_first|| / mean ||dL/dh_last||, "
        "measured in float64 on held-out sequences.",
        "",
        "| cell | hidden | params | T | ratio first/last (init) | ratio (trained) | accuracy | loss "
        "| max grad norm (pre-clip) | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        lines.append(
            f"| {run['cell']} | {run['hidden_size']} | {run['params']} | {run['length']} "
            f"| {run['ratio_init']:.2e} | {run['ratio_trained']:.2e} | {run['accuracy']:.3f} "
            f"| {run['loss']:.3f} | {max(run['grad_norm']):.3g} | {run['train_seconds']:.1f} |")
    lines += [
        "",
        f"Clipping ({clip['cell']}, T = {clip['length']}, {clip['optimizer']} lr {clip['lr']}, "
        f"{config['clip_steps']} steps, same initial weights and batches):",
        "",
        "| run | median grad norm | max grad norm | accuracy | final loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("clipped", "unclipped"):
        run = clip[name]
        lines.append(f"| {name} | {run['grad_norm_median']:.3g} | {run['grad_norm_max']:.3g} "
                     f"| {run['accuracy']:.3f} | {run['train_loss'][-1]:.3f} |")
    return "\n".join(lines) + "\n"


def expand_quick(argv: list[str]) -> list[str]:
    """Lets ``--quick`` stand alone, like ``--dry-run`` (``parse_config`` wants a value for bools)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--quick" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(GradientStudyConfig, expand_quick(list(argv or [])), description=__doc__)
    if config.quick:
        # Quick mode replaces only the defaults the caller did not set, so `--quick --out-dir X` works.
        given = {arg[2:].replace("-", "_") for arg in argv or [] if arg.startswith("--")}
        config = replace(config, **{k: v for k, v in QUICK.items() if k not in given})
    torch.set_num_threads(config.threads)
    if config.replot:
        results = json.loads(Path(config.replot).read_text())
    else:
        started = time.perf_counter()
        steps = 1 if config.dry_run else config.train_steps
        results = {"config": to_dict(config), "torch": torch.__version__}
        results["runs"] = run_length_sweep(config, steps)
        results["clipping"] = run_clipping(config, 1 if config.dry_run else config.clip_steps)
        results["seconds"] = round(time.perf_counter() - started, 1)

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results["charts"] = plot(results, out_dir)
    (out_dir / "results.md").write_text(table(results))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results), flush=True)
    print(f"wrote {', '.join(results['charts'])}, results.md, results.json to {out_dir} "
          f"in {results['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
