"""The training loop: `train_step`, `evaluate`, `fit`. Read it top to bottom.

Per-step metrics stay on the device as running sums; the host reads them only
every `log_every` steps and at the end of each epoch, so the loop never waits
on the device once per batch.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel

from dlrun.config import DlrunError
from dlrun.data import Data, batches, epoch_generator, num_batches
from dlrun.optim import Scheduler, steps_per_batch, warmup_factor
from dlrun.sinks import Sink

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Parts:
    """What a training step works on (built by run.py)."""

    model: nn.Module  # the module whose weights are trained and saved
    optimizer: Optimizer
    scheduler: Scheduler = None
    compiled: nn.Module | None = None  # torch.compile(model) when trainer.compile
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    ema: AveragedModel | None = None  # when trainer.ema_decay > 0

    @property
    def net(self) -> nn.Module:
        """The callable that runs the model (compiled or not); same weights as `model`."""
        return self.compiled if self.compiled is not None else self.model


@dataclass
class TrainState:
    """Where a run is; all of it goes into checkpoints, so a run can continue exactly."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch: int = 0  # micro-batches done in the current, unfinished epoch
    loss_sum: float = 0.0  # running sums over those batches
    correct: int = 0
    seen: int = 0
    skipped: int = 0  # batches skipped for a non-finite loss (trainer.on_nonfinite=skip)
    seconds: float = 0.0  # time spent in the current epoch so far
    best_value: float | None = None  # of the monitored metric
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)  # the record of the best epoch
    last_metrics: dict[str, float] = field(default_factory=dict)  # the record of the last epoch
    patience_best: float | None = None  # early stopping: best value by at least min_delta
    patience_used: int = 0  # evaluations since it improved
    stopped_early: int | None = None  # the epoch early stopping ended the run

    def start_epoch(self) -> None:
        self.batch, self.loss_sum, self.correct, self.seen, self.skipped, self.seconds = 0, 0.0, 0, 0, 0, 0.0


@dataclass
class FitConfig:
    """The plain values `fit` needs (taken from cfg.trainer by run.py)."""

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
    amp_dtype: torch.dtype | None = None  # autocast dtype; None = fp32
    grad_clip: float = 0.0
    clip_by_value: bool = False
    accumulate: int = 1
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    patience: int = 0
    min_delta: float = 0.0
    limit_train_batches: int = 0


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


@contextmanager
def scaled_lr(optimizer: Optimizer, scale: float) -> Iterator[None]:
    """Multiply every group's lr by `scale` for one step, leaving the scheduler's values untouched."""
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr * scale
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr


def train_step(
    parts: Parts, group: Sequence[Batch], cfg: FitConfig, lr_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One optimizer step over a group of micro-batches (one, unless trainer.accumulate > 1).

    Each micro-batch's loss is weighted by its share of the group's samples, so k
    micro-batches give the gradient of one batch k times larger. Returns the summed
    per-sample loss and the correct predictions (on device), the samples used and
    the micro-batches skipped for a non-finite loss (`cfg.skip_nonfinite`: this mode
    copies the buffers, such as batch-norm statistics, and reads the loss, one
    host-device sync per micro-batch, so that a skipped batch changes nothing).
    """
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler
    device = group[0][0].device
    total = sum(len(y) for _, y in group)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = skipped = 0
    optimizer.zero_grad(set_to_none=True)
    for x, y in group:
        buffers = [b.detach().clone() for b in model.buffers()] if cfg.skip_nonfinite else []
        with torch.autocast(device.type, dtype=cfg.amp_dtype, enabled=cfg.amp_dtype is not None):
            logits = parts.net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if cfg.skip_nonfinite and not torch.isfinite(loss):
            with torch.no_grad():
                for live, saved in zip(model.buffers(), buffers):
                    live.copy_(saved)
            skipped += 1
            continue
        weighted = loss * (len(y) / total)
        (scaler.scale(weighted) if scaler is not None else weighted).backward()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(dim=1) == y).sum()
        seen += len(y)
    if seen == 0:
        return loss_sum, correct, seen, skipped

    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    if cfg.grad_clip > 0:
        if cfg.clip_by_value:
            nn.utils.clip_grad_value_(model.parameters(), cfg.grad_clip)
        else:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    with scaled_lr(optimizer, lr_scale):
        if scaler is not None:
            scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
            scaler.update()
        else:
            optimizer.step()
    if steps_per_batch(parts.scheduler):
        parts.scheduler.step()
    if parts.ema is not None:
        parts.ema.update_parameters(model)
    return loss_sum, correct, seen, skipped


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, amp_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Mean loss and accuracy over (x, y), in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for xb, yb in batches(x, y, batch_size):
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    model.train(was_training)
    n = len(y)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


def evaluate_split(parts: Parts, split: str, x: torch.Tensor, y: torch.Tensor, cfg: FitConfig) -> dict[str, float]:
    """`<split>/loss`, `<split>/acc`, and `<split>_ema/...` for the averaged weights when EMA is on."""
    out = {f"{split}/{k}": v for k, v in evaluate(parts.net, x, y, cfg.eval_batch_size, cfg.amp_dtype).items()}
    if parts.ema is not None:
        ema = evaluate(parts.ema.module, x, y, cfg.eval_batch_size, cfg.amp_dtype)
        out.update({f"{split}_ema/{k}": v for k, v in ema.items()})
    return out


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    return best is None or (value > best + min_delta if mode == "max" else value < best - min_delta)


def early_stop(state: TrainState, value: float, patience: int, min_delta: float, mode: str) -> bool:
    """Count evaluations without an improvement of at least `min_delta`; True once `patience` is used up."""
    if patience <= 0:
        return False
    if improved(value, state.patience_best, mode, min_delta):
        state.patience_best, state.patience_used = value, 0
    else:
        state.patience_used += 1
    return state.patience_used >= patience


def micro_batches_per_epoch(n_train: int, cfg: FitConfig) -> int:
    n = num_batches(n_train, cfg.batch_size)
    return min(n, cfg.limit_train_batches) if cfg.limit_train_batches else n


def steps_per_epoch(n_train: int, cfg: FitConfig) -> int:
    """Optimizer steps per epoch: micro-batches grouped by `cfg.accumulate`."""
    return num_batches(micro_batches_per_epoch(n_train, cfg), cfg.accumulate)


def grouped(items: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    it = iter(items)
    while group := list(islice(it, size)):
        yield group


def fit(
    parts: Parts,
    data: Data,
    cfg: FitConfig,
    sinks: Sequence[Sink],
    save: Callable[[TrainState, bool], None],
    state: TrainState | None = None,
    stop: StopFlag | None = None,
) -> TrainState:
    """Train until `cfg.epochs` epochs are complete (or early stopping), from `state`.

    `save(state, is_best)` is called at every epoch end, every `cfg.checkpoint_every`
    steps and when `stop` is set; run.py writes the checkpoints there. The state it
    gets is consistent: continuing from it gives exactly what running on would have.
    """
    state = state or TrainState()
    stop = stop or StopFlag()
    optimizer, scheduler = parts.optimizer, parts.scheduler
    x_train, y_train = data.splits["train"]
    device = x_train.device
    micro_per_epoch = micro_batches_per_epoch(len(y_train), cfg)
    steps = steps_per_epoch(len(y_train), cfg)
    warmup_steps = round(cfg.warmup_epochs * steps)
    for sink in sinks:
        sink.start(cfg.epochs, cfg.epochs * steps, state.step)

    while state.epoch < cfg.epochs and state.stopped_early is None:
        epoch = state.epoch + 1
        parts.model.train()
        # Running sums stay on the device; `sync` reads them into `state` when needed.
        loss_sum = torch.tensor(state.loss_sum, device=device)
        correct = torch.tensor(state.correct, device=device)
        first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss
        started = time.perf_counter() - state.seconds
        lr = optimizer.param_groups[0]["lr"]

        def sync() -> None:
            """Copy the running sums into `state`, failing if the loss went non-finite."""
            if not torch.isfinite(loss_sum):
                raise NonFiniteLoss(
                    f"the training loss became {float(loss_sum)} at step {int(first_bad)} (epoch {epoch}); stopped, "
                    "the last good checkpoint is kept (trainer.on_nonfinite=skip skips such batches instead)"
                )
            state.loss_sum, state.correct = float(loss_sum), int(correct)
            state.seconds = time.perf_counter() - started

        order = batches(x_train, y_train, cfg.batch_size, epoch_generator(cfg.seed, epoch), start=state.batch)
        for group in grouped(islice(order, micro_per_epoch - state.batch), cfg.accumulate):
            if stop.signum is not None:  # the previous step is complete: checkpoint and leave
                sync()
                save(state, False)
                raise Interrupted(stop.signum, state.step)
            scale = warmup_factor(state.step, warmup_steps)
            lr = optimizer.param_groups[0]["lr"] * scale  # the lr this step uses
            step_loss, step_correct, seen, skipped = train_step(parts, group, cfg, scale)
            state.step += 1
            state.batch += len(group)
            state.seen += seen
            state.skipped += skipped
            loss_sum += step_loss
            correct += step_correct
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss), state.step, first_bad)
            if state.step % cfg.log_every == 0 and seen:
                rate = state.seen / (time.perf_counter() - started)
                for sink in sinks:
                    sink.step(epoch, state.step, float(step_loss) / seen, rate)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < micro_per_epoch:
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
            record.update(evaluate_split(parts, "val", *data.splits["val"], cfg))
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
            if early_stop(state, value, cfg.patience, cfg.min_delta, cfg.mode):
                state.stopped_early = epoch
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
