"""Device resolution, seeding and threads: decided once per run, here and nowhere else."""

from __future__ import annotations

import random

import numpy as np
import torch
from omegaconf import DictConfig

from dlrun.config import ConfigError, DeviceType


def resolve_device(cfg: DictConfig) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; `cuda` without CUDA is a clear error."""
    kind = DeviceType(cfg.type).value
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda was asked for, but torch finds no CUDA device "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "use device=cpu or device=auto"
        )
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return torch.device(kind)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
