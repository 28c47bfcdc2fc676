"""Lower-precision copies: dynamic int8 (Linear/LSTM/GRU weights, activations quantised on the fly),
static int8 (post-training, calibrated: convolutions too, for the x86 CPU) and bf16/fp16 casts.

Static int8 uses the PT2E flow of torchao (`torchao.quantization.pt2e`: torch.export, then
`prepare_pt2e` with the X86InductorQuantizer, calibration, `convert_pt2e`). It is PyTorch's supported
path for torch 2.14: the eager `torch.ao.quantization` static flow is deprecated and the PT2E modules
that used to live in `torch.ao.quantization` (quantize_pt2e, X86InductorQuantizer) are gone from
torch 2.14. The converted model holds quantize/dequantize pairs around float ops; it is fast only
once `torch.compile` (inductor, with freezing) fuses them into int8 kernels, so it is measured both
ways (`compiled`).
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Cast(nn.Module):
    """Feeds a half-precision model: casts the input to its dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


class Exported(nn.Module):
    """Holds an exported (PT2E) graph, which is always in inference mode: `train()`/`eval()`, which such a
    graph refuses, change nothing here."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> "Exported":
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def dynamic_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of the Linear, LSTM and GRU layers (CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that quantized tensor types are being phased out
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)


def static_int8(model: nn.Module, calibration: Iterable[torch.Tensor], example: torch.Tensor) -> Exported:
    """Static int8 (PT2E, x86 inductor quantizer): weights per channel, activations per tensor with
    ranges observed on the `calibration` batches (a few training batches)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        return Exported(convert_pt2e(prepared))


def compiled(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.compile (inductor), compiled now on `example`. Call it under
    `torch._inductor.config.patch(freezing=True)`: the int8 kernels of a PT2E model are chosen by
    inductor's freezing passes (the fp32 original gets the same treatment, to compare)."""
    fast = torch.compile(model, dynamic=False)  # freezing with dynamic shapes fails in torch 2.14 (a stride assertion)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast(example)
    return fast
