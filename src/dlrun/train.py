"""The training loop: `train_step`, `evaluate`, `fit`. Read it top to bottom.

Per-step metrics stay on the device as running sums; the host reads them only
every `log_every` steps and at the end of each epoch, so the loop never waits
on the device once per batch.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from functools import cached_property
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel

from dlrun.config.schema import (
    ClipMode,
    DistillConfig,
    EarlyStoppingConfig,
    MonitorMode,
    OnNonFinite,
    Precision,
    TrainerConfig,
    score_name,
    trainer_config,
)
from dlrun.config.validate import resolve_monitor
from dlrun.data import Batch, Data, Mix, Split, batch_generator, build_mix, epoch_generator, num_batches
from dlrun.device import amp_dtype
from dlrun.distributed import SINGLE, Ranks
from dlrun.errors import Interrupted, NonFiniteLoss, StopNow
from dlrun.losses import distill_loss, loss_and_score
from dlrun.optim import Scheduler, steps_per_batch, warmup_factor
from dlrun.sinks import Sink

log = logging.getLogger("dlrun")


@dataclass
class LoopSettings(TrainerConfig):
    """`cfg.trainer` as the loop reads it: every field of the schema, the task, and `monitor` /
    `monitor_mode` resolved for that task. The one route from the config to the loop: a new
    trainer switch is a field of `TrainerConfig` and is read here as `settings.<field>`."""

    task: str = "classification"  # or "regression"

    def __post_init__(self) -> None:
        # values from a saved config or written by hand arrive as plain strings and dicts
        self.precision, self.grad_clip_mode = Precision(self.precision), ClipMode(self.grad_clip_mode)
        self.on_nonfinite = OnNonFinite(self.on_nonfinite)
        if not isinstance(self.early_stopping, EarlyStoppingConfig):
            self.early_stopping = EarlyStoppingConfig(**self.early_stopping)
        if not isinstance(self.distill, DistillConfig):
            self.distill = DistillConfig(**self.distill)
        monitor, mode = resolve_monitor(self, self.task)
        self.monitor, self.monitor_mode = monitor, MonitorMode(mode)

    @classmethod
    def of(cls, trainer: TrainerConfig | DictConfig | dict, task: str, **changes: Any) -> "LoopSettings":
        """From `cfg.trainer` (checked against the schema by `trainer_config`), with `changes` on top."""
        checked = trainer_config(trainer)
        values = {f.name: getattr(checked, f.name) for f in fields(TrainerConfig)}
        return cls(**{**values, **changes}, task=task)

    @property
    def mode(self) -> str:
        """`max` or `min`: how the monitored metric is ranked."""
        return self.monitor_mode.value

    @cached_property  # read at every step
    def amp_dtype(self) -> torch.dtype | None:
        return amp_dtype(self.precision)


@dataclass
class Parts:
    """What a training step works on (built by run.py)."""

    model: nn.Module  # the module whose weights are trained and saved
    optimizer: Optimizer
    scheduler: Scheduler = None
    compiled: nn.Module | None = None  # torch.compile(model) when trainer.compile
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    ema: AveragedModel | None = None  # when trainer.ema_decay > 0
    swa: AveragedModel | None = None  # when trainer.swa_start > 0: updated at epoch ends from that epoch
    ddp: nn.Module | None = None  # DistributedDataParallel around `eval_module` when trainer.devices > 1
    teacher: nn.Module | None = None  # frozen, when trainer.distill.teacher is set

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eval_module(self) -> nn.Module:
        """What evaluation runs: the compiled model, or the model (the same weights)."""
        return self.compiled if self.compiled is not None else self.model

    @property
    def train_module(self) -> nn.Module:
        """What training steps run: `eval_module`, or DDP around it (which averages gradients over the ranks)."""
        return self.ddp if self.ddp is not None else self.eval_module


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
    top_k: list[list[float]] = field(default_factory=list)  # trainer.save_top_k: [monitored value, epoch], best first

    def start_epoch(self) -> None:
        self.batch, self.loss_sum, self.score_sum, self.seen, self.skipped, self.seconds = 0, 0.0, 0.0, 0, 0, 0.0


class StopFlag:
    """Set (to a signal number) by a signal handler; `fit` checks it between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, checkpoints and stops. A second signal stops at once."""
    stop = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise StopNow(signum)
        stop.signum = signum
        log.warning("%s received: finishing the current step and writing a checkpoint", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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


def autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast to `dtype`; for fp32 no context at all (even a disabled autocast costs per step)."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


def train_step(
    parts: Parts, micro_batches: Sequence[Batch], settings: LoopSettings, totals: torch.Tensor,
    lr_scale: float = 1.0, samples: int | None = None, world: int = 1,
) -> tuple[torch.Tensor | None, int, int]:
    """One optimizer step over micro-batches (one, unless trainer.accumulate > 1).

    Each micro-batch's loss is weighted by its share of the step's samples, so k
    micro-batches give the gradient of one batch k times larger. Under DDP they are
    this rank's shards of `samples` samples over `world` ranks; DDP averages the ranks'
    gradients, so the weight is len(shard) * world / samples. Each micro-batch's
    summed loss and score are added to `totals` ([loss, score] on the device, never
    read here). Returns the last micro-batch's mean loss (None if all were skipped),
    and the samples and micro-batches skipped for a non-finite loss (trainer.on_nonfinite=skip:
    this mode copies the buffers, such as batch-norm statistics, and reads the loss, one
    host-device sync per micro-batch, so that a skipped batch changes nothing).
    """
    model, scaler = parts.model, parts.scaler
    skip_nonfinite = settings.on_nonfinite is OnNonFinite.skip
    samples = samples or sum(len(y) for _, y in micro_batches)
    last, skipped_samples, skipped = None, 0, 0
    parts.optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(micro_batches):
        buffers = [b.detach().clone() for b in model.buffers()] if skip_nonfinite else []
        # DDP averages gradients over the ranks once per step, in the last micro-batch's backward
        accumulating = parts.ddp is not None and i < len(micro_batches) - 1
        with parts.ddp.no_sync() if accumulating else nullcontext():
            with autocast(x.device.type, settings.amp_dtype):
                output = parts.train_module(x)
            loss, score = loss_and_score(output, y, settings.task, settings.label_smoothing)
            if parts.teacher is not None:  # knowledge distillation: the teacher's soft targets join the labels
                with torch.no_grad():
                    soft_targets = parts.teacher(x)
                loss = distill_loss(output, soft_targets, loss, settings.distill.temperature, settings.distill.alpha)
            if skip_nonfinite and not torch.isfinite(loss):
                with torch.no_grad():
                    for live, saved in zip(model.buffers(), buffers):
                        live.copy_(saved)
                skipped, skipped_samples = skipped + 1, skipped_samples + len(y)
                continue
            share = len(y) * world / samples
            weighted = loss if share == 1 else loss * share
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        last = loss.detach()
        totals[0].add_(last, alpha=len(y))
        totals[1].add_(score)
    if last is not None:
        optimizer_step(parts, settings, lr_scale)
    return last, skipped_samples, skipped


def optimizer_step(parts: Parts, settings: LoopSettings, lr_scale: float) -> None:
    """Clip the accumulated gradients, step the optimizer (through the GradScaler in fp16) at
    `lr_scale` times the scheduled lr, then the per-batch scheduler and the EMA."""
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    if settings.grad_clip > 0:
        if settings.grad_clip_mode is ClipMode.value:
            nn.utils.clip_grad_value_(model.parameters(), settings.grad_clip)
        else:
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
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


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, batch_size: int, amp_dtype: torch.dtype | None = None,
    task: str = "classification", observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Mean loss and score (accuracy or MAE) over a split, in eval mode; restores the previous mode.
    `observe(output, y)` sees every batch's outputs (the final test analysis, see metrics.py)."""
    was_training = model.training
    model.eval()
    loss_sum = score_sum = None
    for x, y in split.batches(batch_size):
        with autocast(x.device.type, amp_dtype):
            output = model(x)
        loss, score = loss_and_score(output, y, task, reduction="sum")
        if observe is not None:
            observe(output, y)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        score_sum = score if score_sum is None else score_sum + score
    model.train(was_training)
    n = len(split)
    return {"loss": loss_sum.item() / n, score_name(task): score_sum.item() / n}


def evaluate_split(parts: Parts, name: str, split: Split, settings: LoopSettings,
                   observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> dict[str, float]:
    """`<name>/loss`, `<name>/acc` (or mae), and `<name>_ema/...` for the averaged weights when EMA is on;
    `observe` sees the outputs of the model's weights (not the EMA's), batch by batch."""
    def scores(module: nn.Module, observe=None) -> dict[str, float]:
        return evaluate(module, split, settings.eval_batch_size, settings.amp_dtype, settings.task, observe)

    out = {f"{name}/{k}": v for k, v in scores(parts.eval_module, observe).items()}
    if parts.ema is not None:
        out.update({f"{name}_ema/{k}": v for k, v in scores(parts.ema.module).items()})
    return out


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Strictly better than `best` by more than `min_delta` (early stopping's test)."""
    return best is None or (value > best + min_delta if mode == "max" else value < best - min_delta)


def at_least_as_good(value: float, best: float | None, mode: str) -> bool:
    """Better than or equal to `best` (the best epoch's test: ties go to the later epoch)."""
    return best is None or (value >= best if mode == "max" else value <= best)


def early_stop(state: TrainState, value: float, patience: int, min_delta: float, mode: str) -> bool:
    """Count evaluations without an improvement of at least `min_delta`; True once `patience` is used up."""
    if patience <= 0:
        return False
    if improved(value, state.patience_best, mode, min_delta):
        state.patience_best, state.patience_used = value, 0
    else:
        state.patience_used += 1
    return state.patience_used >= patience


def micro_batches_per_epoch(n_train: int, settings: LoopSettings) -> int:
    n = num_batches(n_train, settings.batch_size)
    return min(n, settings.limit_train_batches) if settings.limit_train_batches else n


def steps_per_epoch(n_train: int, settings: LoopSettings) -> int:
    """Optimizer steps per epoch: micro-batches grouped by `settings.accumulate`."""
    return num_batches(micro_batches_per_epoch(n_train, settings), settings.accumulate)


def grouped(items: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class RunningSums:
    """The epoch's [loss, score] sums on the device, read into the state only when needed
    (log, checkpoint and stop points, the epoch's end). Under DDP each rank sums its shards
    and rank 0 carries the sums from before a resume."""

    def __init__(self, state: TrainState, ranks: Ranks, device: torch.device) -> None:
        self.totals = torch.tensor([state.loss_sum, state.score_sum] if ranks.is_main else [0.0, 0.0], device=device)
        self.losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) references, to name a non-finite one
        self.started = time.perf_counter() - state.seconds
        self.ranks = ranks

    def read_into(self, state: TrainState) -> None:
        """Copy the sums (of all ranks) into `state`; fails if the loss went non-finite."""
        sums = self.ranks.sum(self.totals)
        if not torch.isfinite(sums).all():
            step, loss = next(((s, float(v)) for s, v in self.losses if not torch.isfinite(v)), (None, None))
            where = f"{loss} at step {step}" if step else "non-finite on another rank"
            raise NonFiniteLoss(
                f"the training loss became {where} (epoch {state.epoch + 1}); stopped "
                "(trainer.on_nonfinite=skip skips such batches instead)"
            )
        state.loss_sum, state.score_sum = sums.tolist()
        state.seconds = time.perf_counter() - self.started


Save = Callable[[TrainState, bool], None]


def fit(
    parts: Parts,
    data: Data,
    settings: LoopSettings,
    sinks: Sequence[Sink],
    save: Save,
    state: TrainState | None = None,
    stop: StopFlag | None = None,
    ranks: Ranks = SINGLE,
) -> TrainState:
    """Train until `settings.epochs` epochs are complete (or early stopping), from `state`.

    `save(state, is_best)` is called at every epoch end, every `settings.checkpoint_every`
    steps and when `stop` is set; run.py writes the checkpoints there. The state it
    gets is consistent: continuing from it gives exactly what running on would have.

    Under DDP (`ranks`, see distributed.py) every rank runs this same loop in lockstep on
    its shard of each batch; running sums are added up over the ranks when read, rank 0
    evaluates and shares the record, and a stop signal on any rank stops all at one step
    (within `log_every` steps).
    """
    state = state or TrainState()
    stop = stop or StopFlag()
    steps = steps_per_epoch(len(data.splits["train"]), settings)
    for sink in sinks:
        sink.start(settings.epochs, settings.epochs * steps, state.step)
    while state.epoch < settings.epochs and state.stopped_early is None:
        sums = RunningSums(state, ranks, parts.device)
        lr = train_epoch(parts, data, settings, state, sums, sinks, save, stop, ranks)
        sums.read_into(state)
        record, is_best = end_epoch(parts, data, settings, state, lr, ranks)
        if parts.swa is not None and state.epoch >= settings.swa_start:
            parts.swa.update_parameters(parts.model)
        for sink in sinks:
            sink.epoch(record)
        save(state, is_best)
        if signum := ranks.max(stop.signum or 0):
            raise Interrupted(signum, state.step)
    return state


def train_epoch(parts: Parts, data: Data, settings: LoopSettings, state: TrainState, sums: RunningSums,
                sinks: Sequence[Sink], save: Save, stop: StopFlag, ranks: Ranks) -> float | None:
    """The current epoch's remaining steps (from micro-batch `state.batch`); returns the lr of its last step."""
    epoch, train = state.epoch + 1, data.splits["train"]
    micro_per_epoch = micro_batches_per_epoch(len(train), settings)
    warmup_steps = round(settings.warmup_epochs * steps_per_epoch(len(train), settings))
    mix = build_mix(data.spec.input_shape, data.spec.num_outputs, settings.task, settings.mixup, settings.cutmix)
    if settings.freeze_epochs:
        freeze_backbone(parts.model, frozen=epoch <= settings.freeze_epochs)
    parts.model.train()
    order = train.batches(settings.batch_size, epoch_generator(settings.seed, epoch), start=state.batch)
    lr = None
    for micro in grouped(islice(order, micro_per_epoch - state.batch), settings.accumulate):
        if signum := ranks.agree_on_stop(stop.signum or 0, state.step, settings.log_every):
            sums.read_into(state)  # the previous step is complete: checkpoint and leave
            save(state, False)
            raise Interrupted(signum, state.step)
        if data.augment is not None or mix is not None:
            micro = [augmented(x, y, data, mix, batch_generator(settings.seed, epoch, state.batch + i))
                     for i, (x, y) in enumerate(micro)]
        samples = sum(len(y) for _, y in micro)
        scale = warmup_factor(state.step, warmup_steps)
        lr = parts.optimizer.param_groups[0]["lr"] * scale  # the lr this step uses
        shards = [ranks.shard(x, y) for x, y in micro]  # DDP: this rank's slice of each batch
        last, skipped_samples, skipped = train_step(parts, shards, settings, sums.totals, scale, samples, ranks.world)
        state.step += 1
        state.batch += len(micro)
        state.seen += samples - skipped_samples  # DDP never skips batches (config.validate)
        state.skipped += skipped
        if last is not None:
            sums.losses.append((state.step, last))
            if state.step % settings.log_every == 0:
                rate = state.seen / (time.perf_counter() - sums.started)
                for sink in sinks:
                    sink.step(epoch, state.step, float(last), rate)
        if settings.checkpoint_every and state.step % settings.checkpoint_every == 0 and state.batch < micro_per_epoch:
            sums.read_into(state)
            save(state, False)
    return lr


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """trainer.freeze_epochs: only the classifier (`model.head_parameters()`) trains while `frozen`; the optimizer
    skips parameters without gradients. A function of the epoch alone, so a resumed run sets it alike."""
    head = {id(p) for p in model.head_parameters()}
    for p in model.parameters():
        p.requires_grad_(not frozen or id(p) in head)


def augmented(x: torch.Tensor, y: torch.Tensor, data: Data, mix: Mix | None, generator: torch.Generator) -> Batch:
    """A training batch through the dataset's augmentation and then MixUp/CutMix, all drawn from `generator`."""
    if data.augment is not None:
        x = data.augment(x, generator)
    return mix(x, y, generator) if mix is not None else (x, y)


def end_epoch(parts: Parts, data: Data, settings: LoopSettings, state: TrainState, lr: float | None,
              ranks: Ranks) -> tuple[dict[str, Any], bool]:
    """The epoch's record (training sums, validation when due, lr, speed); keeps track of the best
    epoch and early stopping, and moves the state on to the next epoch. Returns the record and
    whether this epoch is the best so far."""
    epoch, seen = state.epoch + 1, max(state.seen, 1)
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": state.step,
        "train/loss": state.loss_sum / seen,
        f"train/{score_name(settings.task)}": state.score_sum / seen,
    }
    if epoch % settings.eval_every == 0 or epoch == settings.epochs:
        # Rank 0 evaluates and the others take its numbers, so all ranks decide alike below.
        record.update(ranks.share(evaluate_split(parts, "val", data.splits["val"], settings) if ranks.is_main else None))
    if state.skipped:
        record["skipped_batches"] = state.skipped
    record.update(lr=lr, seconds=state.seconds, samples_per_s=state.seen / state.seconds)

    is_best = False
    if settings.monitor in record:
        value = record[settings.monitor]
        if parts.scheduler is not None and not steps_per_batch(parts.scheduler):
            parts.scheduler.step(value)  # ReduceLROnPlateau
        # Ties go to the later epoch: a coarse metric such as accuracy often plateaus while the model improves.
        if at_least_as_good(value, state.best_value, settings.mode):
            state.best_value, state.best_epoch, is_best = value, epoch, True
            state.best_metrics = metrics_of(record)
        if settings.save_top_k > 1:
            state.top_k = ranked([*state.top_k, [value, epoch]], settings.mode)[:settings.save_top_k]
        if early_stop(state, value, settings.early_stopping.patience, settings.early_stopping.min_delta, settings.mode):
            state.stopped_early = epoch
    state.epoch = epoch
    state.last_metrics = metrics_of(record)
    state.start_epoch()
    return record, is_best


def ranked(entries: list[list[float]], mode: str) -> list[list[float]]:
    """[value, epoch] entries, best value first; of equal values the later epoch first (as the best epoch is chosen)."""
    sign = -1 if mode == "max" else 1
    return sorted(entries, key=lambda e: (sign * e[0], -e[1]))


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The split/metric entries of an epoch record."""
    return {k: v for k, v in record.items() if "/" in k}
