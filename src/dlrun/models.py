"""Model families. Classes take plain numbers; shapes come from the DataSpec.

Any `nn.Module` whose constructor accepts `in_shape` and `num_outputs` keyword
arguments can be named by `model._target_`; `build_model` supplies both.
"""

from __future__ import annotations

from typing import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from dlrun.config import ConfigError
from dlrun.data import DataSpec


def build_model(cfg: DictConfig, spec: DataSpec) -> nn.Module:
    factory = instantiate(cfg, _partial_=True, _convert_="all")
    return factory(in_shape=tuple(spec.input_shape), num_outputs=spec.num_outputs)


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


class CNN(nn.Module):
    """[conv -> (batch norm) -> ReLU -> (pool) -> (dropout)] per width, then (FC -> ReLU -> dropout) -> head.

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
        dropout: float = 0.0,
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

        flat = in_ch
        for s in size:
            flat *= s
        head: list[nn.Module] = [nn.Flatten()]
        if hidden > 0:
            head += [nn.Linear(flat, hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            flat = hidden
        head.append(nn.Linear(flat, num_outputs))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class RNN(nn.Module):
    """A recurrent classifier over a sequence; the last time step's output feeds the head.

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
    ) -> None:
        super().__init__()
        if len(in_shape) == 2:
            features = in_shape[0]
        elif len(in_shape) == 3:
            features = in_shape[0] * in_shape[2]
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
        out = hidden_size * (2 if bidirectional else 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(out, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (B, C, H, W) -> (B, H, C*W): rows are time steps
            x = x.permute(0, 2, 1, 3).flatten(2)
        else:  # (B, C, L) -> (B, L, C)
            x = x.transpose(1, 2)
        out, _ = self.rnn(x)  # (B, T, hidden * directions)
        return self.head(out[:, -1])
