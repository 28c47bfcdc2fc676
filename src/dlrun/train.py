"""The training loop: `train_step`, `evaluate`, `fit`. Read it top to bottom.

Per-step metrics stay on the device as running sums; the host reads them only
every `log_every` steps and at the end of each epoch, so the loop never waits
on the device once per batch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from dlrun.data import Data, batches, epoch_generator, num_batches
from dlrun.optim import Scheduler, steps_per_batch
from dlrun.sinks import Sink


@dataclass
class TrainState:
    """Progress of a run; everything here goes into checkpoints."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    best_value: float | None = None  # of the monitored metric
    best_epoch: int | None = None


@dataclass
class FitConfig:
    """The plain numbers `fit` needs (taken from cfg.trainer by run.py)."""

    epochs: int
    batch_size: int
    eval_batch_size: int
    seed: int
    eval_every: int
    log_every: int
    monitor: str
    mode: str  # "max" or "min"


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: Optimizer, scheduler: Scheduler
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the batch's mean loss and its number of correct predictions (on device)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if steps_per_batch(scheduler):
        scheduler.step()
    correct = (logits.detach().argmax(dim=1) == y).sum()
    return loss.detach(), correct


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean loss and accuracy over (x, y), in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for xb, yb in batches(x, y, batch_size):
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    model.train(was_training)
    n = len(y)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


def improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def fit(
    model: nn.Module,
    data: Data,
    optimizer: Optimizer,
    scheduler: Scheduler,
    cfg: FitConfig,
    sinks: Sequence[Sink],
    on_epoch_end: Callable[[TrainState, bool], None],
    state: TrainState | None = None,
) -> tuple[TrainState, list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Train for `cfg.epochs` epochs.

    Returns the final state, the per-epoch records (as sent to the sinks) and a
    copy of the weights at the best monitored value.

    `on_epoch_end(state, is_best)` runs after each epoch's metrics are known
    (run.py writes the checkpoints there).
    """
    state = state or TrainState()
    x_train, y_train = data.splits["train"]
    steps_per_epoch = num_batches(len(y_train), cfg.batch_size)
    for sink in sinks:
        sink.start(cfg.epochs, cfg.epochs * steps_per_epoch)
    best_weights = copy.deepcopy(model.state_dict())
    history: list[dict[str, Any]] = []

    while state.epoch < cfg.epochs:
        epoch = state.epoch + 1
        model.train()
        loss_sum = torch.zeros((), device=x_train.device)
        correct = torch.zeros((), device=x_train.device, dtype=torch.long)
        seen = 0
        started = time.perf_counter()
        for x, y in batches(x_train, y_train, cfg.batch_size, epoch_generator(cfg.seed, epoch)):
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
            loss, batch_correct = train_step(model, x, y, optimizer, scheduler)
            loss_sum += loss * len(y)
            correct += batch_correct
            seen += len(y)
            state.step += 1
            if state.step % cfg.log_every == 0:
                rate = seen / (time.perf_counter() - started)
                for sink in sinks:
                    sink.step(epoch, state.step, loss.item(), rate)
        seconds = time.perf_counter() - started

        record: dict[str, Any] = {
            "epoch": epoch,
            "step": state.step,
            "train/loss": loss_sum.item() / seen,
            "train/acc": correct.item() / seen,
        }
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            for key, value in evaluate(model, *data.splits["val"], cfg.eval_batch_size).items():
                record[f"val/{key}"] = value
        record.update(lr=lr, seconds=seconds, samples_per_s=seen / seconds)

        is_best = False
        if cfg.monitor in record:
            value = record[cfg.monitor]
            if scheduler is not None and not steps_per_batch(scheduler):
                scheduler.step(value)  # ReduceLROnPlateau
            if improved(value, state.best_value, cfg.mode):
                state.best_value, state.best_epoch, is_best = value, epoch, True
                best_weights = copy.deepcopy(model.state_dict())
        state.epoch = epoch
        history.append(record)
        for sink in sinks:
            sink.epoch(record)
        on_epoch_end(state, is_best)
    return state, history, best_weights
