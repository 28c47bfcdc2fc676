"""Knowledge distillation (Hinton, Vinyals and Dean 2015): a student trained on a teacher run's soft
targets mixed with the hard labels. `trainer.distill.*` (config/schema.py DistillConfig) turns it on;
run.py loads the teacher with `load_teacher`, train.py's `train_step` calls `distilled`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# what the teacher's data description must share with the student's (mean/std follow from these)
MATCHING = ("name", "task", "input_shape", "num_outputs", "classes")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, hard_loss: torch.Tensor, temperature: float,
                 alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * hard_loss.

    The KL divergence is averaged over the batch; T^2 keeps the soft targets' gradients on the
    scale of the hard loss's as T changes."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * hard_loss


def distilled(hard_loss: torch.Tensor, output: torch.Tensor, teacher: nn.Module, x: torch.Tensor,
              settings: Any) -> torch.Tensor:
    """The training loss with the teacher's soft targets for the batch `x` (`settings.distill`)."""
    with torch.no_grad():
        soft_targets = teacher(x)
    return distill_loss(output, soft_targets, hard_loss, settings.distill.temperature, settings.distill.alpha)


def load_teacher(folder: str, data_description: dict[str, Any], device: torch.device,
                 trust: tuple[str, ...] = ()) -> nn.Module:
    """The teacher run's best model, frozen in eval mode on `device`; its data must be the student's."""
    from dlrun import checkpoint
    from dlrun.data import DataSpec
    from dlrun.errors import ConfigError
    from dlrun.models import build_model
    from dlrun.rundir import RunDir

    key = f"trainer.distill.teacher={folder}"
    if data_description["task"] != "classification":
        raise ConfigError(f"{key} is invalid: distillation needs a classification dataset "
                          f"({data_description['name']} is {data_description['task']})")
    path = RunDir(Path(folder).expanduser().resolve()).best
    saved = checkpoint.load(path)
    theirs = saved.get("data") or {}
    differs = [k for k in MATCHING if theirs.get(k) != data_description.get(k)]
    if differs:
        k = differs[0]
        raise ConfigError(f"{key} is invalid: the teacher was trained on other data ({k} {theirs.get(k)!r}, "
                          f"the student's {data_description.get(k)!r})")
    cfg = checkpoint.config_of(saved, path, trust, consent="{group}._target_={target} on the command line")
    spec = DataSpec(tuple(theirs["input_shape"]), theirs["num_outputs"], theirs["task"])
    with torch.random.fork_rng(devices=[]):  # its initial weights, overwritten below, must not move the student's RNG
        teacher = build_model(cfg.model, spec)
    checkpoint.load_weights(teacher, saved["model"], path)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()
