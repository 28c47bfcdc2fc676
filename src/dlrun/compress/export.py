"""ONNX export with torch.onnx.export (the torch.export-based exporter, onnxscript), checked by running
the file with ONNX Runtime on the CPU against PyTorch's outputs, and timed like every variant."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dlrun.cost import LATENCY_BATCH_CAP, quiet, time_calls
from dlrun.rundir import atomic_write


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: Path) -> None:
    """`model` (eval mode, fp32) as an ONNX file with a dynamic batch dimension."""
    example = torch.randn(2, *input_shape)
    with quiet(), redirect_stdout(io.StringIO()):  # the exporter's warnings and progress lines
        program = torch.onnx.export(model.eval(), (example,), input_names=["x"], output_names=["y"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True)
    atomic_write(path, lambda f: f.write(program.model_proto.SerializeToString()))


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session on `threads` intra-op threads (the count latency is measured at)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_and_time(model: nn.Module, path: Path, x: torch.Tensor, batch: int, threads: int) -> dict[str, Any]:
    """ONNX Runtime's outputs on `x` against PyTorch's (max abs difference) and its latency at batch 1
    and at `batch` (capped like every latency), timed by `dlrun.cost.time_calls`."""
    sess = session(path, threads)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = sess.run(None, {"x": x.numpy()})[0]
    latency = {}
    for b in (1, min(batch, LATENCY_BATCH_CAP)):
        feed = {"x": np.random.default_rng(0).standard_normal((b, *x.shape[1:]), dtype=np.float32)}
        latency[f"batch_{b}"] = {"batch": b, **time_calls(lambda: sess.run(None, feed), threads)}
    return {"max_abs_diff": float(np.abs(got - expected).max()), "latency": latency}
