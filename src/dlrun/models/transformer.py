"""A small Transformer encoder over sequences, image rows or patches."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlrun.errors import ConfigError


class EncoderLayer(nn.Module):
    """Pre-norm: x + attention(LN(x)), then x + MLP(LN(x)) (GELU); dropout on the attention
    weights and on both residual branches."""

    def __init__(self, d_model: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D/H)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.norm2(x)))


def sinusoidal(positions: int, d_model: int) -> torch.Tensor:
    """The fixed encoding of Vaswani et al. (2017): sin on even, cos on odd features. (T, D)"""
    pos = torch.arange(positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(positions, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return table


class Rows(nn.Module):
    """(B, C, H, W) -> (B, H, D): each row's C x W values, embedded by one linear layer. (Not a (1, W)
    convolution: on the CPU, oneDNN's bf16 channels-last kernel gives wrong values for that shape.)"""

    def __init__(self, channels: int, width: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(channels * width, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 2, 1, 3).flatten(2))


class Patches(nn.Module):
    """(B, C, L) or (B, C, H, W) -> (B, T, D): non-overlapping patches, embedded by a convolution
    whose kernel and stride are one patch (as ViT does)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.proj = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, tokens...) -> (B, T, D)


def conv_stem(in_shape: Sequence[int], widths: Sequence[int], kernel: int) -> tuple[nn.Module, tuple[int, ...]]:
    """Convolutions before the tokens (a convolutional tokenizer, as in Hassani et al. 2021's Compact Convolutional
    Transformer): each a "same" conv of `kernel` -> batch norm -> ReLU, 1-D or 2-D as the input; the sizes are kept,
    the channels become the last width. No widths: the identity."""
    conv, norm = (nn.Conv1d, nn.BatchNorm1d) if len(in_shape) == 2 else (nn.Conv2d, nn.BatchNorm2d)
    layers: list[nn.Module] = []
    channels = in_shape[0]
    for width in widths:
        layers += [conv(channels, width, kernel, padding="same", bias=False), norm(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers), (channels, *in_shape[1:])


def tokenizer(in_shape: Sequence[int], d_model: int, patch_size: int) -> tuple[nn.Module, int]:
    """The embedding of the input as tokens, and their number: a (C, L) signal gives L / p tokens of
    p steps (p = 1 with patch_size 0); a (C, H, W) image one token per row (patch_size 0) or
    (H / p) x (W / p) patches of p x p."""
    sizes = list(in_shape[1:])
    if patch_size and any(s % patch_size for s in sizes):
        raise ConfigError(f"model.patch_size={patch_size} does not divide the input size {tuple(sizes)} "
                          f"(the data's {tuple(in_shape)}); use a divisor, or 0 for a step or a row per token")
    if len(in_shape) == 2:
        p = patch_size or 1
        return Patches(nn.Conv1d(in_shape[0], d_model, p, stride=p)), sizes[0] // p
    if not patch_size:
        return Rows(in_shape[0], sizes[1], d_model), sizes[0]
    conv = nn.Conv2d(in_shape[0], d_model, patch_size, stride=patch_size)
    return Patches(conv), (sizes[0] // patch_size) * (sizes[1] // patch_size)


class Transformer(nn.Module):
    """(Convolutions of the `stem` widths ->) tokens (steps, rows or patches) -> linear embedding + positional
    encoding (learned or sinusoidal) -> `layers` pre-norm encoder layers -> LayerNorm -> readout (the mean over
    tokens, or a learned [CLS] token) -> linear."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        *,
        d_model: int,
        heads: int,
        layers: int,
        ff_dim: int,
        dropout: float,
        positional: str,
        readout: str,
        patch_size: int,
        stem: Sequence[int] = (),  # keys added since checkpoints of this class were saved: their defaults (the
        stem_kernel: int = 5,  # schema's) build the model those checkpoints hold (tests/test_models.py)
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ConfigError(f"model.d_model={d_model} is invalid: must be a multiple of model.heads={heads}")
        if len(in_shape) not in (2, 3):
            raise ConfigError(f"model=transformer needs (C, L) or (C, H, W) inputs, the dataset gives "
                              f"{tuple(in_shape)}")
        self.stem, stem_shape = conv_stem(in_shape, stem, stem_kernel)
        self.embed, tokens = tokenizer(stem_shape, d_model, patch_size)
        readout, positional = getattr(readout, "value", readout), getattr(positional, "value", positional)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if readout == "cls" else None
        tokens += self.cls is not None
        if positional == "learned":
            self.pos = nn.Parameter(torch.randn(1, tokens, d_model) * 0.02)
        else:  # a fixed table: not saved in checkpoints, rebuilt from the shape
            self.register_buffer("pos", sinusoidal(tokens, d_model)[None], persistent=False)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.Sequential(*(EncoderLayer(d_model, heads, ff_dim, dropout) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.stem(x))  # (B, T, D)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + T, D)
        x = self.norm(self.layers(self.drop(x + self.pos)))
        return self.fc(x[:, 0] if self.cls is not None else x.mean(dim=1))
