"""The training loop: `train_step`, `evaluate`, `fit`. Read it top to bottom.

Per-step metrics stay on the device as running sums; the host reads them only
every `log_every` steps and at the end of each epoch, so the loop never waits
on the device once per batch.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel

from dlrun.config import DlrunError
from dlrun.data import Batch, Data, Split, batch_generator, epoch_generator, num_batches
from dlrun.distributed import SINGLE, Group
from dlrun.optim import Scheduler, steps_per_batch, warmup_factor
from dlrun.sinks import Sink


@dataclass
class Parts:
    """What a training step works on (built by run.py)."""

    model: nn.Module  # the module whose weights are trained and saved
    optimizer: Optimizer
    scheduler: Scheduler = None
    compiled: nn.Module | None = None  # torch.compile(model) when trainer.compile
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    ema: AveragedModel | None = None  # when trainer.ema_decay > 0
    ddp: nn.Module | None = None  # DistributedDataParallel around `net` when trainer.devices > 1

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def net(self) -> nn.Module:
        """The callable that runs the model (compiled or not); same weights as `model`."""
        return self.compiled if self.compiled is not None else self.model

    @property
    def train_net(self) -> nn.Module:
        """What training steps run: `net`, or DDP around it (which averages gradients over the ranks)."""
        return self.ddp if self.ddp is not None else self.net


@dataclass
class TrainState:
    """Where a run is; all of it goes into checkpoints, so a run can continue exactly."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch: int = 0  # micro-batches done in the current, unfinished epoch
    loss_sum: float = 0.0  # running sums over those batches
    score_sum: float = 0.0  # correct predictions, or absolute errors for regression
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
        self.batch, self.loss_sum, self.score_sum, self.seen, self.skipped, self.seconds = 0, 0.0, 0.0, 0, 0, 0.0


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
    task: str = "classification"  # or "regression"
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
        self.signum, self.step = signum, step


class NonFiniteLoss(DlrunError):
    pass


@contextmanager
def scaled_lr(optimizer: Optimizer, scale: float) -> Iterator[None]:
    """Multiply every group's lr by `scale` for one step, leaving the scheduler's values untouched."""
    if scale == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr * scale
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr


def score_name(task: str) -> str:
    """The second metric next to the loss: accuracy, or mean absolute error for regression."""
    return "mae" if task == "regression" else "acc"


def loss_and_score(output: torch.Tensor, y: torch.Tensor, task: str, label_smoothing: float = 0.0,
                   reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (cross-entropy or MSE) and the batch's score sum (correct predictions or absolute errors)."""
    output = output.float()
    if task == "regression":
        return F.mse_loss(output, y, reduction=reduction), (output.detach() - y).abs().mean(dim=1).sum()
    loss = F.cross_entropy(output, y, label_smoothing=label_smoothing, reduction=reduction)
    return loss, (output.detach().argmax(dim=1) == y).sum()


def autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast to `dtype`; for fp32 no context at all (even a disabled autocast costs per step)."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


def train_step(
    parts: Parts, group: Sequence[Batch], cfg: FitConfig, totals: torch.Tensor, lr_scale: float = 1.0,
    samples: int | None = None, world: int = 1,
) -> tuple[torch.Tensor | None, int, int]:
    """One optimizer step over a group of micro-batches (one, unless trainer.accumulate > 1).

    Each micro-batch's loss is weighted by its share of the group's samples, so k
    micro-batches give the gradient of one batch k times larger. Under DDP the group is
    this rank's shards of `samples` samples over `world` ranks; DDP averages the ranks'
    gradients, so the weight is len(shard) * world / samples. Each micro-batch's
    summed loss and score are added to `totals` ([loss, score] on the device, never
    read here). Returns the last micro-batch's mean loss (None if all were skipped),
    the samples used, and the micro-batches skipped for a non-finite loss
    (`cfg.skip_nonfinite`: this mode copies the buffers, such as batch-norm statistics,
    and reads the loss, one host-device sync per micro-batch, so that a skipped batch
    changes nothing).
    """
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler
    samples = samples or sum(len(y) for _, y in group)
    last, seen, skipped = None, 0, 0
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(group):
        buffers = [b.detach().clone() for b in model.buffers()] if cfg.skip_nonfinite else []
        # DDP averages gradients over the ranks once per step, in the group's last backward
        accumulating = parts.ddp is not None and i < len(group) - 1
        with parts.ddp.no_sync() if accumulating else nullcontext():
            with autocast(x.device.type, cfg.amp_dtype):
                output = parts.train_net(x)
            loss, score = loss_and_score(output, y, cfg.task, cfg.label_smoothing)
            if cfg.skip_nonfinite and not torch.isfinite(loss):
                with torch.no_grad():
                    for live, saved in zip(model.buffers(), buffers):
                        live.copy_(saved)
                skipped += 1
                continue
            share = len(y) * world / samples
            weighted = loss if share == 1 else loss * share
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        last = loss.detach()
        totals[0].add_(last, alpha=len(y))
        totals[1].add_(score)
        seen += len(y)
    if last is None:
        return None, seen, skipped

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
    return last, seen, skipped


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, batch_size: int, amp_dtype: torch.dtype | None = None,
    task: str = "classification",
) -> dict[str, float]:
    """Mean loss and score (accuracy or MAE) over a split, in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    loss_sum = score_sum = None
    for x, y in split.batches(batch_size):
        with autocast(x.device.type, amp_dtype):
            output = model(x)
        loss, score = loss_and_score(output, y, task, reduction="sum")
        loss_sum = loss if loss_sum is None else loss_sum + loss
        score_sum = score if score_sum is None else score_sum + score
    model.train(was_training)
    n = len(split)
    return {"loss": loss_sum.item() / n, score_name(task): score_sum.item() / n}


def evaluate_split(parts: Parts, name: str, split: Split, cfg: FitConfig) -> dict[str, float]:
    """`<name>/loss`, `<name>/acc` (or mae), and `<name>_ema/...` for the averaged weights when EMA is on."""
    out = {f"{name}/{k}": v for k, v in evaluate(parts.net, split, cfg.eval_batch_size, cfg.amp_dtype, cfg.task).items()}
    if parts.ema is not None:
        ema = evaluate(parts.ema.module, split, cfg.eval_batch_size, cfg.amp_dtype, cfg.task)
        out.update({f"{name}_ema/{k}": v for k, v in ema.items()})
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
    ranks: Group = SINGLE,
) -> TrainState:
    """Train until `cfg.epochs` epochs are complete (or early stopping), from `state`.

    `save(state, is_best)` is called at every epoch end, every `cfg.checkpoint_every`
    steps and when `stop` is set; run.py writes the checkpoints there. The state it
    gets is consistent: continuing from it gives exactly what running on would have.

    Under DDP (`ranks`, see distributed.py) every rank runs this same loop in lockstep on
    its shard of each batch; running sums are added up over the ranks when read, rank 0
    evaluates and shares the record, and a stop signal on any rank stops all at one step
    (within `log_every` steps).
    """
    state = state or TrainState()
    stop = stop or StopFlag()
    optimizer, scheduler = parts.optimizer, parts.scheduler
    train = data.splits["train"]
    device = parts.model_device
    micro_per_epoch = micro_batches_per_epoch(len(train), cfg)
    steps = steps_per_epoch(len(train), cfg)
    warmup_steps = round(cfg.warmup_epochs * steps)
    for sink in sinks:
        sink.start(cfg.epochs, cfg.epochs * steps, state.step)

    while state.epoch < cfg.epochs and state.stopped_early is None:
        epoch = state.epoch + 1
        parts.model.train()
        # Running sums stay on the device; `sync` reads them into `state` when needed.
        # [loss, score]; under DDP each rank sums its shards and rank 0 carries the earlier sums
        totals = torch.tensor([state.loss_sum, state.score_sum] if ranks.is_main else [0.0, 0.0], device=device)
        step_losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) references, to name a non-finite one
        started = time.perf_counter() - state.seconds
        lr = optimizer.param_groups[0]["lr"]

        def sync() -> None:
            """Copy the running sums (of all ranks) into `state`, failing if the loss went non-finite."""
            sums = ranks.sum(totals)
            if not torch.isfinite(sums).all():
                step, loss = next(((s, float(v)) for s, v in step_losses if not torch.isfinite(v)), (None, None))
                where = f"{loss} at step {step}" if step else "non-finite on another rank"
                raise NonFiniteLoss(
                    f"the training loss became {where} (epoch {epoch}); stopped, the last "
                    "good checkpoint is kept (trainer.on_nonfinite=skip skips such batches instead)"
                )
            state.loss_sum, state.score_sum = sums.tolist()
            state.seconds = time.perf_counter() - started

        order = train.batches(cfg.batch_size, epoch_generator(cfg.seed, epoch), start=state.batch)
        for group in grouped(islice(order, micro_per_epoch - state.batch), cfg.accumulate):
            signum = stop.signum or 0
            if ranks.world > 1:  # all ranks stop at one step; agreeing costs an all-reduce, so every log_every
                signum = ranks.max(signum) if state.step % cfg.log_every == 0 else 0
            if signum:  # the previous step is complete: checkpoint and leave
                sync()
                save(state, False)
                raise Interrupted(signum, state.step)
            if data.augment is not None:
                group = [(data.augment(x, batch_generator(cfg.seed, epoch, state.batch + i)), y)
                         for i, (x, y) in enumerate(group)]
            samples = sum(len(y) for _, y in group)
            group = [ranks.shard(x, y) for x, y in group]  # DDP: this rank's slice of each batch
            scale = warmup_factor(state.step, warmup_steps)
            lr = optimizer.param_groups[0]["lr"] * scale  # the lr this step uses
            last, seen, skipped = train_step(parts, group, cfg, totals, scale, samples, ranks.world)
            state.step += 1
            if last is not None:
                step_losses.append((state.step, last))
            state.batch += len(group)
            state.seen += seen if ranks.world == 1 else samples  # DDP never skips batches (config.validate)
            state.skipped += skipped
            if state.step % cfg.log_every == 0 and last is not None:
                rate = state.seen / (time.perf_counter() - started)
                for sink in sinks:
                    sink.step(epoch, state.step, float(last), rate)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < micro_per_epoch:
                sync()
                save(state, False)
        sync()

        seen = max(state.seen, 1)
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": state.step,
            "train/loss": state.loss_sum / seen,
            f"train/{score_name(cfg.task)}": state.score_sum / seen,
        }
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            # Rank 0 evaluates and the others take its numbers, so all ranks decide alike below.
            record.update(ranks.share(evaluate_split(parts, "val", data.splits["val"], cfg) if ranks.is_main else None))
        if state.skipped:
            record["skipped_batches"] = state.skipped
        record.update(lr=lr, seconds=state.seconds, samples_per_s=state.seen / state.seconds)

        is_best = False
        if cfg.monitor in record:
            value = record[cfg.monitor]
            if scheduler is not None and not steps_per_batch(scheduler):
                scheduler.step(value)  # ReduceLROnPlateau
            # Ties go to the later epoch: a coarse metric such as accuracy often plateaus
            # while the model keeps improving.
            if state.best_value is None or not improved(state.best_value, value, cfg.mode):
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
        if signum := ranks.max(stop.signum or 0):
            raise Interrupted(signum, state.step)
    return state


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The split/metric entries of an epoch record."""
    return {k: v for k, v in record.items() if "/" in k}
