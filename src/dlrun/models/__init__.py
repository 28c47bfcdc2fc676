"""Model families. Classes take plain numbers; shapes come from the DataSpec.

Their keyword defaults are the schema's (config/schema.py: CNNConfig, MLPConfig, RNNConfig);
tests/test_models.py fails if the two disagree.

Any `nn.Module` whose constructor accepts `in_shape` and `num_outputs` keyword
arguments can be named by `model._target_`; `build_model` supplies both.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from dlrun.config.targets import instantiate_trusted
from dlrun.data import DataSpec
from dlrun.errors import ConfigError


def build_model(cfg: DictConfig, spec: DataSpec) -> nn.Module:
    """`cfg._target_(in_shape=..., num_outputs=..., **keys)`; every key must be a constructor parameter."""
    factory = instantiate_trusted(cfg, cfg._target_, _partial_=True, _convert_="all")  # its own: see targets.py
    check_keys(factory.func, [k for k in cfg if k != "_target_"], "model")
    return factory(in_shape=tuple(spec.input_shape), num_outputs=spec.num_outputs)


def check_keys(constructor: Callable[..., Any], keys: list[str], group: str) -> None:
    """Config keys the constructor does not take are a clear error (as torchtune checks them), not a TypeError."""
    params = inspect.signature(constructor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    taken = [name for name in params if name not in ("in_shape", "num_outputs")]
    unknown = [k for k in keys if k not in params]
    if unknown:
        name = getattr(constructor, "__qualname__", str(constructor))
        raise ConfigError(f"{group}.{unknown[0]} is not a parameter of {name}; it takes: {', '.join(taken)}")


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


class CNN(nn.Module):
    """[conv -> (batch norm) -> ReLU -> (pool) -> (dropout)] per width, then an MLP head
    (flatten -> (FC `hidden` -> ReLU -> dropout) -> FC to the outputs).

    A (C, L) input gets 1-D layers, a (C, H, W) input 2-D layers. Convolutions keep
    the spatial size ("same" padding); each pooling stage halves it.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        pool: str = "max",
        batch_norm: bool = True,
        dropout: float = 0.1,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if len(in_shape) not in (2, 3):
            raise ConfigError(f"model=cnn needs (C, L) or (C, H, W) inputs, the dataset gives {tuple(in_shape)}")
        dims = len(in_shape) - 1
        Conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
        Norm = (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1]
        Pool = {"max": (nn.MaxPool1d, nn.MaxPool2d), "avg": (nn.AvgPool1d, nn.AvgPool2d)}.get(pool)
        Drop = (nn.Dropout1d, nn.Dropout2d)[dims - 1]

        size = list(in_shape[1:])
        layers: list[nn.Module] = []
        in_ch = in_shape[0]
        for width in channels:
            layers.append(Conv(in_ch, width, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
            if kernel_size % 2 == 0:  # even kernels grow the size by one with this padding
                size = [s + 1 for s in size]
            if batch_norm:
                layers.append(Norm(width))
            layers.append(nn.ReLU(inplace=True))
            if Pool is not None:
                if min(size) < 2:
                    raise ConfigError(
                        f"model.channels={list(channels)} pools the input {tuple(in_shape)} below one element; "
                        "use fewer layers or model.pool=none"
                    )
                layers.append(Pool[dims - 1](2))
                size = [s // 2 for s in size]
            if dropout > 0:
                layers.append(Drop(dropout))
            in_ch = width
        self.features = nn.Sequential(*layers)

        features = (in_ch, *size)  # (C, L') or (C, H', W') after the pooling stages
        self.head = MLP(features, num_outputs, hidden=[hidden] if hidden > 0 else [], batch_norm=False, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten, then [linear -> (batch norm) -> ReLU -> (dropout)] per hidden width, then the head.

    With no hidden layers it is multinomial logistic regression.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        hidden: Sequence[int] = (256, 128),
        batch_norm: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        width = math.prod(in_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RNN(nn.Module):
    """A recurrent classifier over a sequence; `readout` picks what feeds the head: the last
    time step's output, the mean over steps, or all steps concatenated.

    A (C, L) signal is read as L steps of C features; a (C, H, W) image row by row,
    as H steps of C*W features.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        cell: str = "lstm",
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        readout: str = "last",
    ) -> None:
        super().__init__()
        if len(in_shape) == 2:
            features, steps = in_shape[0], in_shape[1]
        elif len(in_shape) == 3:
            features, steps = in_shape[0] * in_shape[2], in_shape[1]
        else:
            raise ConfigError(f"model=rnn needs (C, L) or (C, H, W) inputs, the dataset gives {tuple(in_shape)}")
        Cell = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = Cell(
            features,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.readout = readout
        out = hidden_size * (2 if bidirectional else 1) * (steps if readout == "flatten" else 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(out, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (B, C, H, W) -> (B, H, C*W): rows are time steps
            x = x.permute(0, 2, 1, 3).flatten(2)
        else:  # (B, C, L) -> (B, L, C)
            x = x.transpose(1, 2)
        out, _ = self.rnn(x)  # (B, T, hidden * directions)
        if self.readout == "flatten":
            out = out.flatten(1)  # (B, T * hidden * directions)
        elif self.readout == "mean":
            out = out.mean(dim=1)
        else:
            out = out[:, -1]
        return self.head(out)
