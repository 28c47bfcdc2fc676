"""Convolutional networks: the `channels` shorthand, or an explicit list of `blocks`, then a head.

A (C, L) input gets 1-D layers, a (C, H, W) input 2-D layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from dlrun.errors import ConfigError


@dataclass(frozen=True)
class Block:
    """conv -> (batch norm) -> ReLU -> (pool) -> (dropout): the keys of one `model.blocks` entry (their defaults,
    filled into every entry of a composed config: config/schema.py ConvBlockConfig)."""

    channels: int
    kernel: int
    stride: int
    padding: str  # same: kernel // 2 on each side (the size / stride for odd kernels); valid: none
    pool: str  # max, avg or none
    pool_size: int  # window and stride of the pooling
    dropout: float  # element-wise, as Keras' Dropout and torch's nn.Dropout
    channel_dropout: bool = False  # whole channels (Dropout1d/2d): the `channels` shorthand's kind; not a config key


BLOCK_KEYS = tuple(f.name for f in fields(Block) if f.name != "channel_dropout")


def plain(value: Any) -> Any:
    """A config enum (a str subclass) as its plain value."""
    return getattr(value, "value", value)


def parse_blocks(blocks: Sequence[Mapping[str, Any] | Block]) -> list[Block]:
    """`model.blocks` entries (dicts from the config, or Blocks) as Blocks; an unknown or a missing key is a
    one-line error."""
    parsed = []
    for i, entry in enumerate(blocks):
        if isinstance(entry, Block):
            parsed.append(entry)
            continue
        unknown = [k for k in entry if k not in BLOCK_KEYS]
        if unknown:
            raise ConfigError(f"model.blocks[{i}].{unknown[0]} is not a block key; allowed: {', '.join(BLOCK_KEYS)}")
        missing = [k for k in BLOCK_KEYS if k not in entry]
        if missing:
            raise ConfigError(f"model.blocks[{i}] names no {', '.join(missing)} (every key of a block: "
                              f"{', '.join(BLOCK_KEYS)}; a composed config fills them in)")
        block = Block(**{k: plain(v) for k, v in entry.items()})
        for key, allowed in (("padding", ("same", "valid")), ("pool", ("none", "max", "avg"))):
            if getattr(block, key) not in allowed:
                raise ConfigError(f"model.blocks[{i}].{key}={getattr(block, key)!r} is invalid; allowed: {', '.join(allowed)}")
        parsed.append(block)
    return parsed


def shorthand_blocks(channels: Sequence[int], kernel_size: int, pool: str, dropout: float) -> list[Block]:
    """`model.channels` as blocks: "same" convolutions, each followed by a pool of 2 and channel dropout."""
    return [Block(c, kernel_size, 1, "same", plain(pool), 2, dropout, channel_dropout=True) for c in channels]


def conv_size(size: int, block: Block) -> int:
    pad = block.kernel // 2 if block.padding == "same" else 0
    return (size + 2 * pad - block.kernel) // block.stride + 1


class CNN(nn.Module):
    """[conv -> (batch norm) -> ReLU -> (pool) -> (dropout)] per block, then the head:
    flatten (or global average pool) -> [FC `hidden` -> ReLU -> dropout] -> FC to the outputs.

    The blocks are either `blocks` (model=cnn_blocks: each a dict of Block's keys) or one per width of
    `channels` (model=cnn): "same" convolutions of `kernel_size`, a `pool` of 2 and channel-wise `dropout`
    after each; one of the two, never both. `hidden` is one width (0 = none) or a list. `head_dropout`
    is the dropout after every hidden layer and right before the output layer; None keeps `dropout`
    after the hidden layers only.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        *,
        channels: Sequence[int] | None = None,  # model=cnn's layers (None: the blocks are given) ...
        kernel_size: int | None = None,
        pool: str | None = None,
        blocks: Sequence[Mapping[str, Any] | Block] | None = None,  # ... or model=cnn_blocks'
        batch_norm: bool,
        dropout: float,
        hidden: int | Sequence[int],
        head: str,
        head_dropout: float | None,
    ) -> None:
        super().__init__()
        if len(in_shape) not in (2, 3):
            raise ConfigError(f"model=cnn needs (C, L) or (C, H, W) inputs, the dataset gives {tuple(in_shape)}")
        if (blocks is None) == (channels is None):
            raise ConfigError("a CNN takes model.channels (model=cnn) or model.blocks (model=cnn_blocks), one of the two")
        if blocks is None:
            if kernel_size is None or pool is None:
                raise ConfigError("model.channels needs model.kernel_size and model.pool")
            spec = shorthand_blocks(channels, kernel_size, pool, dropout)
            where = f"model.channels={list(channels)}"
        else:
            spec, where = parse_blocks(blocks), "model.blocks"
        self.features, out_shape = conv_stack(in_shape, spec, batch_norm, where)
        widths = ([hidden] if hidden > 0 else []) if isinstance(hidden, int) else list(hidden)
        self.head = Head(out_shape, num_outputs, widths, plain(head) == "avg",
                         dropout if head_dropout is None else head_dropout, head_dropout is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def conv_stack(in_shape: Sequence[int], spec: list[Block], batch_norm: bool,
               where: str) -> tuple[nn.Sequential, tuple[int, ...]]:
    """The blocks as one Sequential, and the (C, L') or (C, H', W') they leave; a block that
    leaves no element is a ConfigError naming it and the size it gets."""
    dims = len(in_shape) - 1
    Conv, Norm = (nn.Conv1d, nn.Conv2d)[dims - 1], (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1]
    Pool = {"max": (nn.MaxPool1d, nn.MaxPool2d), "avg": (nn.AvgPool1d, nn.AvgPool2d)}
    ChannelDrop = (nn.Dropout1d, nn.Dropout2d)[dims - 1]
    size, in_ch, layers = list(in_shape[1:]), in_shape[0], []
    for i, b in enumerate(spec):
        if min(conv_size(s, b) for s in size) < 1:
            raise ConfigError(f"model.blocks[{i}] (kernel {b.kernel}, padding {b.padding}, stride {b.stride}) gets "
                              f"an input of {tuple(size)} from the data's {tuple(in_shape)} and leaves nothing; "
                              "use padding: same, a smaller kernel or stride, or fewer blocks")
        pad = b.kernel // 2 if b.padding == "same" else 0
        layers.append(Conv(in_ch, b.channels, b.kernel, stride=b.stride, padding=pad, bias=not batch_norm))
        size = [conv_size(s, b) for s in size]
        if batch_norm:
            layers.append(Norm(b.channels))
        layers.append(nn.ReLU(inplace=True))
        if b.pool != "none":
            if min(size) < b.pool_size:
                raise ConfigError(
                    f"{where} pools the input {tuple(in_shape)} below one element; use fewer layers or model.pool=none"
                    if where.startswith("model.channels") else
                    f"model.blocks[{i}] pools an input of {tuple(size)} (from the data's {tuple(in_shape)}) with "
                    f"pool_size {b.pool_size}, which leaves nothing; use pool: none, a smaller pool_size or fewer blocks")
            layers.append(Pool[b.pool][dims - 1](b.pool_size))
            size = [s // b.pool_size for s in size]
        if b.dropout > 0:
            layers.append(ChannelDrop(b.dropout) if b.channel_dropout else nn.Dropout(b.dropout))
        in_ch = b.channels
    return nn.Sequential(*layers), (in_ch, *size)


class Head(nn.Module):
    """flatten (or global average pool) -> [linear -> ReLU -> (dropout)] per hidden width -> linear.

    `before_output`: with no hidden layers, `dropout` still comes right before the output layer."""

    def __init__(self, features: Sequence[int], num_outputs: int, hidden: Sequence[int], average: bool,
                 dropout: float, before_output: bool) -> None:
        super().__init__()
        dims = len(features) - 1
        layers: list[nn.Module] = [(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[dims - 1](1)] if average else []
        layers.append(nn.Flatten())
        width = features[0] if average else math.prod(features)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            width = h
        if not hidden and before_output and dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
