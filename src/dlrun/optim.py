"""Optimizer and scheduler builders.

The config names the callable (`_target_`), the code supplies what only the run
knows: the parameters, the number of steps, the monitored metric's direction.
Every scheduler returned here is stepped once per optimizer step, except
ReduceLROnPlateau, which is stepped after each validation with the monitored value.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from omegaconf import DictConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from dlrun.config.targets import instantiate_trusted
from dlrun.errors import ConfigError

Scheduler = LRScheduler | ReduceLROnPlateau | None


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, decay_norm_and_bias: bool = True) -> Optimizer:
    """The configured optimizer; with `decay_norm_and_bias=False`, biases and normalisation
    weights (every parameter with fewer than two dimensions) get no weight decay."""
    fused = {"fused": fused_kernels(model)} if cfg.get("fused", False) is None else {}
    factory = instantiate_trusted(cfg, _partial_=True, _convert_="all", **fused)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = model.parameters() if decay_norm_and_bias else [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    with refused_keys("optimizer", cfg):
        return factory(groups)


@contextmanager
def refused_keys(group: str, cfg: DictConfig) -> Iterator[None]:
    """A value the schema cannot check (`optimizer.betas=[0.9]`) that the torch class refuses: one line naming
    the group and torch's reason, not a traceback."""
    try:
        yield
    except (TypeError, ValueError, IndexError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{group}: {cfg._target_} refuses its settings ({type(err).__name__}: {reason}); "
                          f"see `dlrun --cfg job` for {group}'s keys") from None


def fused_kernels(model: torch.nn.Module) -> bool:
    """Whether torch's fused optimizer kernels apply: floating-point parameters on the CPU or CUDA.
    (A config saved before `fused` existed has no such key and keeps the unfused step, so that a
    resumed run continues exactly as it began.)"""
    params = list(model.parameters())
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_scheduler(cfg: DictConfig, optimizer: Optimizer, steps_per_epoch: int, total_steps: int, mode: str) -> Scheduler:
    factory = instantiate_trusted(cfg, _partial_=True, _convert_="all")
    with refused_keys("scheduler", cfg):
        return factory(optimizer, steps_per_epoch=steps_per_epoch, total_steps=total_steps, mode=mode)


def steps_per_batch(scheduler: Scheduler) -> bool:
    return scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau)


# Builders named by conf/scheduler/*. Each takes the same runtime arguments.


def no_scheduler(optimizer: Optimizer, *, steps_per_epoch: int, total_steps: int, mode: str) -> None:
    return None


def step_lr(optimizer: Optimizer, *, steps_per_epoch: int, total_steps: int, mode: str, step_epochs: int, gamma: float) -> LambdaLR:
    """lr * gamma ** (completed epochs // step_epochs), stepped per batch."""
    every = step_epochs * steps_per_epoch
    return LambdaLR(optimizer, lambda step: gamma ** (step // every))


def cosine_lr(
    optimizer: Optimizer, *, steps_per_epoch: int, total_steps: int, mode: str, min_lr_ratio: float
) -> LambdaLR:
    """Cosine decay from the lr to `min_lr_ratio * lr` over the whole run."""

    def factor(step: int) -> float:
        progress = min(1.0, step / max(1, total_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The lr multiplier for optimizer step `step` (0-based) of a linear warmup; 1 after it."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def onecycle_lr(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    total_steps: int,
    mode: str,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
) -> OneCycleLR:
    """OneCycle with the optimizer's configured lr as the peak."""
    peaks = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(
        optimizer,
        max_lr=peaks,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )


def plateau_lr(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    total_steps: int,
    mode: str,
    factor: float,
    patience: int,
    threshold: float,
    min_lr: float,
) -> ReduceLROnPlateau:
    return ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold, min_lr=min_lr)
