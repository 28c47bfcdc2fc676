"""Checkpoints: plain dicts of tensors and Python values, written atomically, loaded safely."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlrun.config import ConfigError
from dlrun.train import Parts, TrainState


def save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the previous file or the new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`: a checkpoint can hold tensors and plain values, never code."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt, foreign or unsafe files
        raise ConfigError(f"checkpoint {path} cannot be loaded safely: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise ConfigError(f"checkpoint {path} is not a dlrun checkpoint (no 'model' entry)")
    return obj


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (Python, numpy, torch CPU and CUDA), as checkpoint-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_checkpoint(parts: Parts, state: TrainState, **extra: Any) -> dict[str, Any]:
    """Everything needed to continue a run exactly (`extra`: the config, versions, ...)."""
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": None if parts.scheduler is None else parts.scheduler.state_dict(),
        "scaler": None if parts.scaler is None else parts.scaler.state_dict(),
        "ema": None if parts.ema is None else parts.ema.state_dict(),
        "state": dataclasses.asdict(state),
        "rng": rng_state(),
        **extra,
    }


def restore_training(ckpt: dict[str, Any], parts: Parts) -> TrainState:
    """Load a `training_checkpoint` into freshly built parts; the RNGs continue where they were."""
    parts.model.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    for name in ("scheduler", "scaler", "ema"):
        obj = getattr(parts, name)
        if obj is not None:
            obj.load_state_dict(ckpt[name])
    set_rng_state(ckpt["rng"])
    return TrainState(**ckpt["state"])
