"""Recurrent networks (plain RNN, LSTM, GRU) over sequences, or over images row by row."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dlrun.errors import ConfigError


class RNN(nn.Module):
    """A recurrent classifier over a sequence; `readout` picks what feeds the head: the last
    time step's output, the mean over steps, or all steps concatenated.

    A (C, L) signal is read as L steps of C features; a (C, H, W) image row by row,
    as H steps of C*W features. With `patch_size` p, p consecutive steps are read at once (L/p steps of p*C
    features, p rows at a time): the recurrence, which costs most, runs p times fewer steps.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        *,
        cell: str,
        hidden_size: int,
        num_layers: int,
        bidirectional: bool,
        dropout: float,
        readout: str,
        patch_size: int = 1,  # a default: checkpoints saved before the key existed hold configs without it
    ) -> None:
        super().__init__()
        if len(in_shape) == 2:
            features, steps = in_shape[0], in_shape[1]
        elif len(in_shape) == 3:
            features, steps = in_shape[0] * in_shape[2], in_shape[1]
        else:
            raise ConfigError(f"model=rnn needs (C, L) or (C, H, W) inputs, the dataset gives {tuple(in_shape)}")
        if steps % patch_size:
            raise ConfigError(f"model.patch_size={patch_size} does not divide the {steps} steps of the input "
                              f"{tuple(in_shape)}; allowed: a divisor of {steps}")
        features, steps = features * patch_size, steps // patch_size
        self.patch_size = patch_size
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
        x = x.reshape(x.shape[0], x.shape[1] // self.patch_size, -1)  # (B, T / p, p * features)
        out, _ = self.rnn(x)  # (B, T, hidden * directions)
        if self.readout == "flatten":
            out = out.flatten(1)  # (B, T * hidden * directions)
        elif self.readout == "mean":
            out = out.mean(dim=1)
        else:
            out = out[:, -1]
        return self.head(out)
