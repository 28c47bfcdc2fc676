"""Checkpoints: plain dicts of tensors and Python values, written atomically, loaded safely."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dlrun.config import ConfigError


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
