"""A model as a file that runs without dlrun: ONNX (torch.onnx.export, the torch.export-based exporter with
onnxscript; run by ONNX Runtime), TorchScript (torch.jit.trace) and a torch.export archive (.pt2). Each has a
dynamic batch dimension and a way to run it back (`load_exported`), so that its outputs can be checked
against PyTorch's; dlrun-compress also times the ONNX file like every variant."""

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


def export_torchscript(model: nn.Module, input_shape: Sequence[int], path: Path) -> None:
    """`model` (eval mode) traced by torch.jit.trace on a batch of 2 (every dlrun model is one straight path
    with no data-dependent branch, which tracing records exactly; sizes are taken from the input at run time)."""
    example = torch.randn(2, *input_shape)
    with quiet(), torch.no_grad():  # TorchScript's deprecation notices and the tracer's warnings
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
        atomic_write(path, lambda f: torch.jit.save(traced, f))


def export_pt2(model: nn.Module, input_shape: Sequence[int], path: Path) -> None:
    """`model` (eval mode) as a torch.export archive with a dynamic batch dimension (torch.export.load reads it)."""
    example = torch.randn(2, *input_shape)
    with quiet():
        program = torch.export.export(model.eval(), (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    atomic_write(path, lambda f: torch.export.save(program, f))


# format -> (the exporter, the file's suffix)
FORMATS = {"onnx": (export_onnx, ".onnx"), "torchscript": (export_torchscript, ".torchscript.pt"),
           "pt2": (export_pt2, ".pt2")}


def load_exported(path: Path, fmt: str, threads: int = 1):
    """A function from a float32 batch (a tensor) to the outputs (a numpy array), running the exported file
    with its own runtime: ONNX Runtime, torch.jit.load or torch.export.load."""
    if fmt == "onnx":
        sess = session(path, threads)
        return lambda x: sess.run(None, {"x": x.numpy()})[0]
    with quiet():
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()

    def call(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(x).numpy()

    return call


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
