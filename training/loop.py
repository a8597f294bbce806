"""The training loop every task shares: AdamW, gradient-norm clipping and logging, early stopping."""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class FitResult:
    best_metrics: dict[str, float]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def fit(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    train_batches: Callable[[int], Iterable[Any]],
    evaluate: Callable[[nn.Module], dict[str, float]],
    *,
    select: str,
    maximize: bool = True,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    clip_grad_norm: float | None = 1.0,
    patience: int = 3,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    lr_schedule: str = "constant",
    desc: str = "train",
) -> FitResult:
    """Trains ``model`` in place and leaves it holding the weights of the best epoch.

    Args:
        loss_fn: maps (model, batch) to a scalar loss.
        train_batches: maps an epoch number to an iterable of batches (reshuffled per epoch).
        evaluate: maps the model (in eval mode) to metrics; ``select`` names the one that picks
            the best epoch and drives early stopping.
        clip_grad_norm: maximum global gradient norm; ``None`` disables clipping. The pre-clip norm
            is logged either way, since exploding gradients are the classic RNN failure
            (Pascanu et al. 2013).
        patience: epochs without improvement before stopping.
        max_steps: stop after this many optimizer steps in total (``--dry-run`` uses 1).
        max_seconds: wall-clock budget; no new epoch starts once it is spent (the caller's batch
            iterable may also stop mid-epoch at the same deadline).
        lr_schedule: ``constant``, or ``cosine``: the learning rate follows half a cosine from
            ``lr`` down to ``lr / 50`` over ``epochs``, stepped once per epoch (Loshchilov &
            Hutter 2017, without restarts), so the last epochs settle instead of oscillating.
    """
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs - 1, 1),
                                                            eta_min=lr / 50)
                 if lr_schedule == "cosine" else None)
    best_score, best_state, best_metrics, best_epoch = -math.inf, None, {}, -1
    history: list[dict[str, Any]] = []
    steps, stale, started = 0, 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        epoch_lr = optimizer.param_groups[0]["lr"]
        grad_norms: list[float] = []
        losses: list[float] = []
        progress = tqdm(train_batches(epoch), desc=f"{desc} epoch {epoch}", leave=False,
                        mininterval=2.0)
        for batch in progress:
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = clip_grad_norm if clip_grad_norm is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            optimizer.step()
            losses.append(loss.item())
            grad_norms.append(grad_norm)
            steps += 1
            progress.set_postfix(loss=f"{losses[-1]:.4f}", grad_norm=f"{grad_norm:.3f}")
            if max_steps is not None and steps >= max_steps:
                break
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "grad_norm_mean": float(np.mean(grad_norms)),
            "grad_norm_max": float(np.max(grad_norms)),
            "clipped_fraction": float(np.mean([g > (clip_grad_norm or math.inf) for g in grad_norms])),
            "lr": epoch_lr,
            "seconds": time.perf_counter() - started,
            **metrics,
        }
        history.append(record)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in record.items()), flush=True)
        score = metrics[select] if maximize else -metrics[select]
        if score > best_score:
            best_score, best_metrics, best_epoch, stale = score, metrics, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if scheduler is not None:
            scheduler.step()
        if stale >= patience or (max_steps is not None and steps >= max_steps):
            break
        if max_seconds is not None and time.perf_counter() - started >= max_seconds:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_metrics, best_epoch, history, time.perf_counter() - started)
