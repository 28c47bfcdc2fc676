"""Optimizers are built from config; schedulers follow their formulas step by step."""

from __future__ import annotations

import math

import pytest
import torch

from dlrun.config.schema import GROUPS
from dlrun.optim import build_optimizer, build_scheduler, steps_per_batch, warmup_factor


def model():
    return torch.nn.Linear(3, 2)


@pytest.mark.parametrize(
    "name,cls", [("sgd", "SGD"), ("momentum", "SGD"), ("rmsprop", "RMSprop"), ("adam", "Adam"), ("adamw", "AdamW")]
)
def test_optimizers(make_cfg, name, cls):
    cfg = make_cfg(f"optimizer={name}", "optimizer.lr=0.123")
    opt = build_optimizer(cfg.optimizer, model())
    assert type(opt).__name__ == cls and opt.param_groups[0]["lr"] == 0.123


def lrs(make_cfg, name, *overrides, steps=20, steps_per_epoch=4):
    cfg = make_cfg("optimizer=sgd", "optimizer.lr=1.0", f"scheduler={name}", *overrides)
    opt = build_optimizer(cfg.optimizer, model())
    sched = build_scheduler(cfg.scheduler, opt, steps_per_epoch, steps, "max")
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        if steps_per_batch(sched):
            sched.step()
    return sched, seen


def test_none(make_cfg):
    sched, seen = lrs(make_cfg, "none")
    assert sched is None and seen == [1.0] * 20


def test_step(make_cfg):
    _, seen = lrs(make_cfg, "step", "scheduler.step_epochs=2", "scheduler.gamma=0.5")
    assert seen[:8] == [1.0] * 8 and seen[8:16] == [0.5] * 8 and seen[16] == 0.25


def test_cosine(make_cfg):
    _, seen = lrs(make_cfg, "cosine", "scheduler.min_lr_ratio=0.1")
    assert seen[0] == pytest.approx(1.0) and seen == sorted(seen, reverse=True)
    assert seen[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 12 / 20)))


def test_warmup_factor():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_onecycle_peaks_at_configured_lr(make_cfg):
    _, seen = lrs(make_cfg, "onecycle", "scheduler.pct_start=0.25")
    assert max(seen) == pytest.approx(1.0) and seen[0] == pytest.approx(1.0 / 25)
    assert seen.index(max(seen)) == 4  # 25% of 20 steps, counted from zero


def test_plateau_steps_on_the_metric(make_cfg):
    cfg = make_cfg("optimizer=sgd", "optimizer.lr=1.0", "scheduler=plateau", "scheduler.patience=1")
    opt = build_optimizer(cfg.optimizer, model())
    sched = build_scheduler(cfg.scheduler, opt, 4, 20, "max")
    assert not steps_per_batch(sched)
    for value in (0.5, 0.6, 0.6, 0.6):
        sched.step(value)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_every_scheduler_option_is_tested():
    assert set(GROUPS["scheduler"]) == {"none", "step", "cosine", "onecycle", "plateau"}
