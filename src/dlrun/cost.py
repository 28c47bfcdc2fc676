"""What a model costs: parameters, size, FLOPs, latency and peak memory, measured on the run's device."""

from __future__ import annotations

import resource
import statistics
import sys
import time
import warnings
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dlrun.models import count_parameters


def size_mb(model: nn.Module) -> float:
    """Bytes of all parameters and buffers, in MiB (what a state dict holds)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


@torch.no_grad()
def flops_per_sample(model: nn.Module, input_shape: Sequence[int], device: torch.device) -> int:
    """Forward FLOPs for one sample, counted by PyTorch's FlopCounterMode (matmuls and convolutions;
    a multiply-add counts two; element-wise ops, norms and pooling are not counted).

    The fused oneDNN/cuDNN recurrent kernels are switched off while counting, so that an RNN
    runs as the matmuls the counter sees."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oneDNN's note about Intel GPUs when its flags change
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False), counter:
            model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops()


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: Sequence[int], batch: int, device: torch.device,
               repeats: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of one forward pass of `batch` samples, after `warmup` passes."""
    was_training = model.training
    model.eval()
    x = torch.randn(batch, *input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        started = time.perf_counter()
        model(x)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    model.train(was_training)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA's allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process RSS"


def model_cost(model: nn.Module, input_shape: Sequence[int], batch_size: int, device: torch.device) -> dict[str, Any]:
    """The summary's `cost` entries that describe the model itself."""
    return {
        "parameters": count_parameters(model),
        "size_mb": size_mb(model),
        "flops_per_sample": flops_per_sample(model, input_shape, device),
        "latency_ms": {
            "batch_1": latency_ms(model, input_shape, 1, device),
            f"batch_{batch_size}": latency_ms(model, input_shape, batch_size, device),
        },
    }
