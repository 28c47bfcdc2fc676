"""The training loop: `train_step`, `evaluate`, `fit`. Read it top to bottom.

Per-step metrics stay on the device as running sums; the host reads them only
every `log_every` steps and at the end of each epoch, so the loop never waits
on the device once per batch.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from dlrun.config import DlrunError
from dlrun.data import Data, batches, epoch_generator, num_batches
from dlrun.optim import Scheduler, steps_per_batch
from dlrun.sinks import Sink


@dataclass
class TrainState:
    """Where a run is; all of it goes into checkpoints, so a run can continue exactly."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken (batches consumed)
    batch: int = 0  # batches done in the current, unfinished epoch
    loss_sum: float = 0.0  # running sums over those batches
    correct: int = 0
    seen: int = 0
    skipped: int = 0  # batches skipped for a non-finite loss (trainer.on_nonfinite=skip)
    seconds: float = 0.0  # time spent in the current epoch so far
    best_value: float | None = None  # of the monitored metric
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)  # the record of the best epoch
    last_metrics: dict[str, float] = field(default_factory=dict)  # the record of the last epoch

    def start_epoch(self) -> None:
        self.batch, self.loss_sum, self.correct, self.seen, self.skipped, self.seconds = 0, 0.0, 0, 0, 0, 0.0


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
    checkpoint_every: int = 0  # steps; 0 = at epoch ends only
    skip_nonfinite: bool = False


class StopFlag:
    """Set (to a signal number) by a signal handler; `fit` checks it between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None


class Interrupted(DlrunError):
    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; a checkpoint was written")
        self.signum = signum


class NonFiniteLoss(DlrunError):
    pass


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: Optimizer,
    scheduler: Scheduler,
    skip_nonfinite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One optimizer step; returns the batch's mean loss and its number of correct predictions (on device).

    With `skip_nonfinite`, a batch whose loss is NaN or inf changes nothing, not even the
    batch-norm statistics its forward pass updated, and returns None (this mode copies the
    buffers and reads the loss: one host-device sync per step).
    """
    buffers = [b.detach().clone() for b in model.buffers()] if skip_nonfinite else []
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    if skip_nonfinite and not torch.isfinite(loss):
        with torch.no_grad():
            for live, saved in zip(model.buffers(), buffers):
                live.copy_(saved)
        return None
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
    save: Callable[[TrainState, bool], None],
    state: TrainState | None = None,
    stop: StopFlag | None = None,
) -> TrainState:
    """Train until `cfg.epochs` epochs are complete, starting from `state` (a fresh run or a checkpoint).

    `save(state, is_best)` is called at every epoch end, every `cfg.checkpoint_every`
    steps and when `stop` is set; run.py writes the checkpoints there. The state it
    gets is consistent: continuing from it gives exactly what running on would have.
    """
    state = state or TrainState()
    stop = stop or StopFlag()
    x_train, y_train = data.splits["train"]
    device = x_train.device
    steps_per_epoch = num_batches(len(y_train), cfg.batch_size)
    for sink in sinks:
        sink.start(cfg.epochs, cfg.epochs * steps_per_epoch, state.step)

    while state.epoch < cfg.epochs:
        epoch = state.epoch + 1
        model.train()
        # Running sums stay on the device; `sync` reads them into `state` when needed.
        loss_sum = torch.tensor(state.loss_sum, device=device)
        correct = torch.tensor(state.correct, device=device)
        first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss
        started = time.perf_counter() - state.seconds
        lr = optimizer.param_groups[0]["lr"]

        def sync() -> None:
            """Copy the running sums into `state`, failing if the loss went non-finite."""
            if not torch.isfinite(loss_sum):
                bad = int(first_bad)
                raise NonFiniteLoss(
                    f"the training loss became {float(loss_sum)} at step {bad} (epoch {epoch}); stopped, "
                    "the last good checkpoint is kept (trainer.on_nonfinite=skip skips such batches instead)"
                )
            state.loss_sum, state.correct = float(loss_sum), int(correct)
            state.seconds = time.perf_counter() - started

        order = epoch_generator(cfg.seed, epoch)
        for x, y in batches(x_train, y_train, cfg.batch_size, order, start=state.batch):
            if stop.signum is not None:  # the previous step is complete: checkpoint and leave
                sync()
                save(state, False)
                raise Interrupted(stop.signum, state.step)
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
            out = train_step(model, x, y, optimizer, scheduler, cfg.skip_nonfinite)
            state.step += 1
            state.batch += 1
            if out is None:
                state.skipped += 1
                continue
            loss, batch_correct = out
            loss_sum += loss * len(y)
            correct += batch_correct
            state.seen += len(y)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), state.step, first_bad)
            if state.step % cfg.log_every == 0:
                rate = state.seen / (time.perf_counter() - started)
                for sink in sinks:
                    sink.step(epoch, state.step, loss.item(), rate)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < steps_per_epoch:
                sync()
                save(state, False)
        sync()

        seen = max(state.seen, 1)
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": state.step,
            "train/loss": state.loss_sum / seen,
            "train/acc": state.correct / seen,
        }
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            for key, value in evaluate(model, *data.splits["val"], cfg.eval_batch_size).items():
                record[f"val/{key}"] = value
        if state.skipped:
            record["skipped_batches"] = state.skipped
        record.update(lr=lr, seconds=state.seconds, samples_per_s=state.seen / state.seconds)

        is_best = False
        if cfg.monitor in record:
            value = record[cfg.monitor]
            if scheduler is not None and not steps_per_batch(scheduler):
                scheduler.step(value)  # ReduceLROnPlateau
            if improved(value, state.best_value, cfg.mode):
                state.best_value, state.best_epoch, is_best = value, epoch, True
                state.best_metrics = metrics_of(record)
        state.epoch = epoch
        state.last_metrics = metrics_of(record)
        state.start_epoch()
        for sink in sinks:
            sink.epoch(record)
        save(state, is_best)
        if stop.signum is not None:
            raise Interrupted(stop.signum, state.step)
    return state


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The split/metric entries of an epoch record."""
    return {k: v for k, v in record.items() if "/" in k}
