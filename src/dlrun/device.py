"""Device resolution, seeding, threads, autocast and memory format: decided once per run, here and nowhere else."""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from dlrun.config.schema import DeviceType, Precision
from dlrun.cpus import usable_cpus


def resolve_device(asked: str) -> torch.device:
    """`device.type`: `auto` picks CUDA when present, else the CPU (`cuda` without CUDA was refused by
    config.validate, before the run folder existed)."""
    kind = DeviceType(asked).value
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(kind)


def set_threads(threads: int) -> None:
    """`device.threads` intra-op threads; 0: torch's default, capped at the CPUs this process may use
    (its affinity mask, cgroup quota or Slurm allocation: torch counts the host's cores)."""
    torch.set_num_threads(threads if threads > 0 else min(torch.get_num_threads(), usable_cpus()))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for `trainer.precision` (None: plain fp32)."""
    return {Precision.fp32: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[Precision(precision)]


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """`torch.use_deterministic_algorithms(True)` for the duration of a run, when asked for."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def use_channels_last(asked: bool | None, model: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device,
                      amp: torch.dtype | None) -> bool:
    """`trainer.channels_last`: true or false as asked; null (the default) decides: NHWC for a model with
    2-D convolutions on images, in fp32 on the CPU (faster training steps for dlrun's CNNs on an x86 CPU:
    bench/loop_overhead.py, whose ratios the README's Performance table shows) and on CUDA under autocast
    (tensor cores). Plain fp32 on CUDA stays NCHW (not measured here), and so does bf16 on the CPU:
    oneDNN's bf16 NHWC convolution in torch 2.14 returns wrong values for some shapes (1 input channel,
    a (1, W) kernel)."""
    if asked is not None:
        return asked
    convolutional = len(input_shape) == 3 and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return convolutional and ((device.type == "cpu" and amp is None) or (device.type == "cuda" and amp is not None))
