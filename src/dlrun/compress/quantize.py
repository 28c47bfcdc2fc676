"""Lower-precision copies: dynamic int8 (Linear/LSTM/GRU weights, activations quantised on the fly),
static int8 (post-training, calibrated: convolutions too, for the x86 CPU) and bf16/fp16 casts.

Static int8 uses the PT2E flow of torchao (`torchao.quantization.pt2e`: torch.export, then
`prepare_pt2e` with the X86InductorQuantizer, calibration, `convert_pt2e`). It is PyTorch's supported
path for torch 2.14: the eager `torch.ao.quantization` static flow is deprecated and the PT2E modules
that used to live in `torch.ao.quantization` (quantize_pt2e, X86InductorQuantizer) are gone from
torch 2.14. The converted model holds quantize/dequantize pairs around float ops; it is fast only
once `torch.compile` (inductor, with freezing) fuses them into int8 kernels, so it is measured both
ways (`compiled`). Inductor's int8 lowering of 1-D convolutions fails in torch 2.14 (a reshape of the
wrong size), so a 1-D convolution stack is quantised as the same network in 2-D over a height-1 input
(`as_2d`: the same weights, outputs checked equal).
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from dlrun.cost import quiet

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
    with quiet():  # torch's note that quantized tensor types are being phased out
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)


class Rows2d(nn.Module):
    """Feeds a (N, C, L) batch to a 2-D network as (N, C, 1, L)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.unsqueeze(2))


def _first(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def _layer_2d(layer: nn.Module) -> nn.Module | None:
    """The 2-D layer that computes what a 1-D one does over a height-1 input (None: not a 1-D layer)."""
    if isinstance(layer, nn.Conv1d):
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, (1, layer.kernel_size[0]), (1, layer.stride[0]),
                         (0, layer.padding[0]), (1, layer.dilation[0]), layer.groups, layer.bias is not None)
        conv.weight.data = layer.weight.data.unsqueeze(2).clone()
        if layer.bias is not None:
            conv.bias.data = layer.bias.data.clone()
        return conv
    if isinstance(layer, nn.BatchNorm1d):
        norm = nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        norm.load_state_dict(layer.state_dict())
        return norm
    if isinstance(layer, (nn.MaxPool1d, nn.AvgPool1d)):
        k, st, p = (_first(getattr(layer, a)) for a in ("kernel_size", "stride", "padding"))
        return (nn.MaxPool2d if isinstance(layer, nn.MaxPool1d) else nn.AvgPool2d)((1, k), (1, st), (0, p))
    if isinstance(layer, nn.AdaptiveAvgPool1d) and layer.output_size in (1, (1,)):
        return nn.AdaptiveAvgPool2d(1)
    if isinstance(layer, nn.Dropout1d):
        return nn.Dropout2d(layer.p)
    return None


def as_2d(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """`model` with its 1-D layers (convolution, batch norm, pooling, channel dropout) made 2-D over a
    height-1 input (`Rows2d`), if that computes the same outputs for `example` (a network whose forward
    works on the length dimension itself would not); else `model` unchanged."""
    if example.dim() != 3 or not any(_layer_2d(m) is not None for m in model.modules()):
        return model
    flat = copy.deepcopy(model)
    for module in list(flat.modules()):
        for name, child in module.named_children():
            replacement = _layer_2d(child)
            if replacement is not None:
                setattr(module, name, replacement)
    rows = Rows2d(flat).eval()
    try:
        with torch.no_grad():
            ours, theirs = rows(example), model.eval()(example)
        same = ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    except RuntimeError:
        same = False
    return rows if same else model


def static_int8(model: nn.Module, calibration: Iterable[torch.Tensor], example: torch.Tensor) -> Exported:
    """Static int8 (PT2E, x86 inductor quantizer): weights per channel, activations per tensor with
    ranges observed on the `calibration` batches (a few training batches); 1-D networks as 2-D (`as_2d`)."""
    with quiet("torch.utils._pytree"):  # torchao's registrations log notes when imported
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    batch = torch.export.Dim("batch", min=1, max=1024)
    model = as_2d(model.eval(), example)
    with quiet():
        graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
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
    with torch.no_grad(), quiet():
        fast(example)
    return fast
