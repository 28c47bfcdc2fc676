"""trainer.lr_find: the learning-rate range test (Smith 2017; fastai's `lr_find`, Lightning's `Tuner.lr_find`)
before training.

The model trains for up to `lr_find_steps` steps with the learning rate rising geometrically from
`lr_find_min_lr` to `lr_find_max_lr`, one batch per step, as the run's own training step does them; the loss
is smoothed (an exponential average with fastai's bias correction) and the test stops early once it exceeds
4x its best (it diverged). The suggestion is where the smoothed loss falls fastest against log(lr) (Lightning's
"steepest descent", skipping the first 10 points). Afterwards the model, the optimizer, the GradScaler and
the random number generators are exactly as before: the run that follows starts from the same state as
without the test, with the suggested lr if `lr_find_apply`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import torch

from dlrun.data import Data, batch_generator, epoch_generator
from dlrun.train import LoopSettings, Parts, train_step

SMOOTHING = 0.98  # fastai's and Lightning's beta
DIVERGED = 4.0  # stop once the smoothed loss is this many times its best
SKIP_BEGIN = 10  # the first points are noisy (Lightning's skip_begin)


def lr_find(parts: Parts, data: Data, settings: LoopSettings) -> dict[str, Any]:
    """The range test on `parts` (left as they were); returns the lrs tried, the smoothed losses and the suggestion."""
    saved = snapshot(parts)
    try:
        lrs, losses = probe(parts, data, settings)
    finally:
        restore(parts, saved)
    return {"suggestion": suggest(lrs, losses), "lrs": lrs, "losses": losses, "steps": len(lrs),
            "diverged": len(lrs) < settings.lr_find_steps, "min_lr": settings.lr_find_min_lr,
            "max_lr": settings.lr_find_max_lr}


def probe(parts: Parts, data: Data, settings: LoopSettings) -> tuple[list[float], list[float]]:
    """Train at rising lrs (no scheduler, warmup or EMA: the lr is set for each step) and record the smoothed
    losses; the batches come in the order of the run's first epochs, augmented as they would be there."""
    steps, low, high = settings.lr_find_steps, settings.lr_find_min_lr, settings.lr_find_max_lr
    step_parts = replace(parts, scheduler=None, ema=None)
    train, totals = data.splits["train"], torch.zeros(2, device=next(parts.model.parameters()).device)
    lrs, losses, average, best, epoch = [], [], 0.0, math.inf, 0
    parts.model.train()
    while len(lrs) < steps:
        epoch += 1
        for i, (x, y) in enumerate(train.batches(settings.batch_size, epoch_generator(settings.seed, epoch))):
            if len(lrs) == steps:
                break
            if data.augment is not None:
                x = data.augment(x, batch_generator(settings.seed, epoch, i))
            lr = low * (high / low) ** (len(lrs) / max(steps - 1, 1))
            for group in parts.optimizer.param_groups:
                group["lr"] = lr
            loss, _, _ = train_step(step_parts, [(x, y)], settings, totals)  # None: skipped as non-finite
            average = SMOOTHING * average + (1 - SMOOTHING) * (float(loss) if loss is not None else math.inf)
            smoothed = average / (1 - SMOOTHING ** (len(lrs) + 1))
            if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
                return lrs, losses
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
    return lrs, losses


def suggest(lrs: list[float], losses: list[float]) -> float | None:
    """The lr where the smoothed loss falls fastest against log(lr), after the first SKIP_BEGIN points; None
    when the test ran too few steps to tell."""
    if len(losses) < SKIP_BEGIN + 3:
        return None
    logs = [math.log(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(SKIP_BEGIN, len(lrs) - 1)]
    return lrs[SKIP_BEGIN + min(range(len(slopes)), key=slopes.__getitem__)]


def snapshot(parts: Parts) -> dict[str, Any]:
    """Copies of what the test changes: weights and buffers, optimizer (with its lrs) and GradScaler state, RNGs."""
    return {"model": copy.deepcopy(parts.model.state_dict()), "optimizer": copy.deepcopy(parts.optimizer.state_dict()),
            "scaler": copy.deepcopy(parts.scaler.state_dict()) if parts.scaler is not None else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore(parts: Parts, saved: dict[str, Any]) -> None:
    parts.model.load_state_dict(saved["model"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    if parts.scaler is not None:
        parts.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    parts.optimizer.zero_grad(set_to_none=True)
