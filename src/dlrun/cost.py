"""What a model costs: parameters, size, FLOPs, latency and peak memory, measured on the run's device."""

from __future__ import annotations

import logging
import resource
import sys
import time
import timeit
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> dict[str, int]:
    """All parameters of the model, and those that train."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def size_mb(model: nn.Module) -> float:
    """Bytes of all parameters and buffers, in MiB (what a state dict holds)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


# FlopCounterMode counts scaled_dot_product_attention's CUDA kernels but has no formula for the CPU
# one (torch 2.14): the same count as the others (the two attention matmuls), from the shapes.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def flops_per_sample(model: nn.Module, input_shape: Sequence[int], device: torch.device) -> int:
    """Forward FLOPs for one sample, counted by PyTorch's FlopCounterMode (matmuls and convolutions;
    a multiply-add counts two; element-wise ops, norms and pooling are not counted)."""
    return count_flops(model, input_shape, device).get_total_flops()


def count_flops(model: nn.Module, input_shape: Sequence[int], device: torch.device) -> FlopCounterMode:
    """FlopCounterMode after one forward pass of one sample in eval mode (its counts are per module too)."""
    with flop_counting(model) as counter:
        model(torch.zeros(1, *input_shape, device=device))
    return counter


@contextmanager
def flop_counting(model: nn.Module) -> Iterator[FlopCounterMode]:
    """Within the block, `model` in eval mode without gradients and the FLOPs of what runs counted by the yielded
    FlopCounterMode (its mode restored after). The fused oneDNN/cuDNN recurrent kernels are switched off while
    counting, so that an RNN runs as the matmuls the counter sees."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    try:
        with quiet(), torch.no_grad():  # quiet: oneDNN's note about Intel GPUs when its flags change
            with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False), counter:
                yield counter
    finally:
        model.train(was_training)


def layer_table(model: nn.Module, input_shape: Sequence[int], device: torch.device, depth: int) -> str:
    """The model layer by layer down to `depth` (trainer.model_summary): name, type, output shape for one sample
    (torchinfo runs the forward pass, in eval mode: no dropout draw, no batch-norm update), parameters and forward
    FLOPs (counted in that same pass per module, as `flops_per_sample` counts them); a container's figures include
    its layers'."""
    import torchinfo

    with flop_counting(model) as counter:
        layers = torchinfo.summary(model, input_data=[torch.zeros(1, *input_shape, device=device)], depth=depth,
                                   verbose=0, device=device, mode="eval").summary_list
    root = type(model).__name__
    names = {id(m): name for name, m in model.named_modules()}
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    rows = [("layer", "type", "output shape", "parameters", "FLOPs")]
    for layer in (layer for layer in layers if layer.depth <= depth):
        name = names.get(id(layer.module), layer.var_name)
        shape = "x".join(map(str, layer.output_size[1:])) if layer.output_size else "-"
        params = sum(p.numel() for p in layer.module.parameters())
        rows.append(("  " * layer.depth + (name or root), layer.class_name, shape, f"{params:,}",
                     f"{flops.get(f'{root}.{name}' if name else root, 0):,}"))
    total = count_parameters(model)
    rows.append(("total", "", "", f"{total['total']:,}", f"{counter.get_total_flops():,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    if total["trainable"] != total["total"]:
        lines.append(f"trainable parameters: {total['trainable']:,}")
    return "\n".join(lines) + "\n"


# The batch a latency is measured at is capped: the figure is per call, and a run with
# trainer.batch_size=100000 must not spend minutes and gigabytes timing one synthetic batch.
LATENCY_BATCH_CAP = 256
LATENCY_METHOD = ("timeit with a clock that synchronises CUDA, under the stated torch thread count (as "
                  "torch.utils.benchmark.Timer times): two warm-up calls (the second sizes the blocks), then 5 "
                  "timed blocks (at least 3) of calls filling min_run_time; figures per call over the blocks")
BLOCKS = 5


def time_calls(call: Callable[[], Any], threads: int | None = None, min_run_time: float = 0.2) -> dict[str, Any]:
    """How long `call()` takes: the standard library's timeit under `threads` torch threads, with a
    clock that waits for CUDA's queued work (what torch.utils.benchmark.Timer does; importing that
    package costs ~60 ms, as much as the rest of a small run's measurement). Two warm-up calls, the
    second of which sizes the blocks, then BLOCKS blocks of calls that together take about
    `min_run_time` seconds (at least 3 blocks of one call for a slow call). So the whole measurement
    stays within about `min_run_time` plus three calls, whatever the call costs. Median,
    interquartile range, min and max per call over the blocks, in ms, with the torch thread count it
    ran under (`threads`; None: the current count). Anything callable can be timed this way (an ONNX
    Runtime session too), so every variant is measured alike."""
    threads = threads or torch.get_num_threads()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def clock() -> float:
        sync()
        return time.perf_counter()

    timer = timeit.Timer(call, timer=clock)
    with torch_threads(threads):
        timer.timeit(1)  # first-call set-up (oneDNN primitives, allocations)
        one = max(timer.timeit(1), 1e-9)
        blocks = max(3, min(BLOCKS, int(min_run_time / one)))
        number = max(1, int(min_run_time / blocks / one))
        times = [timer.timeit(number) / number for _ in range(blocks)]  # seconds per call, one value per block
    ms = torch.tensor(times, dtype=torch.float64) * 1000
    q1, median, q3 = torch.quantile(ms, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median_ms": median, "iqr_ms": q3 - q1, "min_ms": ms.min().item(), "max_ms": ms.max().item(),
            "blocks": blocks, "calls_per_block": number, "threads": threads}


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` within the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Within the block, the named loggers (torch's internal notes that say nothing to a dlrun user,
    such as torchao's registrations) pass errors only; Python warnings are not shown either."""
    saved = [(logger, logger.level) for logger in map(logging.getLogger, loggers)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger, _ in saved:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in saved:
                logger.setLevel(level)


@torch.no_grad()
def latency(model: nn.Module, input_shape: Sequence[int], batch: int, device: torch.device,
            threads: int | None = None, min_run_time: float = 0.2, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """One forward pass of `batch` random samples (capped at LATENCY_BATCH_CAP), timed by `time_calls`,
    in eval mode; `batch` in the result is the batch actually measured."""
    measured = min(batch, LATENCY_BATCH_CAP)
    was_training = model.training
    model.eval()
    x = torch.randn(measured, *input_shape, device=device, dtype=dtype)
    try:
        return {"batch": measured, **time_calls(lambda: model(x), threads, min_run_time)}
    finally:
        model.train(was_training)


def latency_pair(model: nn.Module, input_shape: Sequence[int], batch_size: int, device: torch.device,
                 threads: int | None = None, min_run_time: float = 0.2) -> dict[str, Any]:
    """Latency at batch 1 and at a full batch (`batch_size`, capped), keyed `batch_1` and `batch_<measured>`."""
    one = latency(model, input_shape, 1, device, threads, min_run_time)
    full = latency(model, input_shape, batch_size, device, threads, min_run_time)
    return {"batch_1": one, f"batch_{full['batch']}": full}


def latency_entries(pair: dict[str, Any]) -> dict[str, Any]:
    """The summary's latency keys from `latency_pair`: `latency_ms` (the medians, by batch: what tables
    print) and `latency` (the full measurement: method, threads, and per batch the measured batch,
    median, IQR, min, max, blocks)."""
    threads = next(iter(pair.values()))["threads"]
    return {"latency_ms": {k: v["median_ms"] for k, v in pair.items()},
            "latency": {"method": LATENCY_METHOD, "threads": threads,
                        **{k: {f: x for f, x in v.items() if f != "threads"} for k, v in pair.items()}}}


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA's allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process RSS"


# The latency every run measures after training: per batch size, 1% of the training time, between
# 10 and 50 ms (a 1-second run spends ~30 ms on it in all; dlrun-compress, which is about latency,
# times longer).
RUN_LATENCY_SHARE, RUN_LATENCY_S = 0.01, (0.01, 0.05)


def run_latency_budget(train_seconds: float) -> float:
    return min(max(RUN_LATENCY_SHARE * train_seconds, RUN_LATENCY_S[0]), RUN_LATENCY_S[1])


def model_cost(model: nn.Module, input_shape: Sequence[int], batch_size: int, device: torch.device,
               train_seconds: float, threads: int | None = None) -> dict[str, Any]:
    """The summary's `cost` entries that describe the model itself (latency: see `latency_entries`),
    the latency timed within `run_latency_budget(train_seconds)` per batch size."""
    budget = run_latency_budget(train_seconds)
    return {
        "parameters": count_parameters(model),
        "size_mb": size_mb(model),
        "flops_per_sample": flops_per_sample(model, input_shape, device),
        **latency_entries(latency_pair(model, input_shape, batch_size, device, threads, budget)),
    }
