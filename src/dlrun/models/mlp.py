"""The multilayer perceptron (and, with no hidden layers, logistic regression)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then [linear -> (batch norm) -> ReLU -> (dropout)] per hidden width, then the head.

    With no hidden layers it is multinomial logistic regression.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        *,
        hidden: Sequence[int],
        batch_norm: bool,
        dropout: float,
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
