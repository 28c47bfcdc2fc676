"""The CIFAR residual networks (He et al., 2016, section 4.2), for 1-D and 2-D inputs."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlrun.errors import ConfigError


class BasicBlock(nn.Module):
    """conv3 -> BN -> ReLU -> conv3 -> BN, plus the shortcut, -> ReLU. A shortcut that changes the
    shape subsamples by the stride and pads the new channels with zeros (the paper's option A: no parameters)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dims: int) -> None:
        super().__init__()
        Conv, Norm = (nn.Conv1d, nn.Conv2d)[dims - 1], (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1]
        self.conv1 = Conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = Norm(out_ch)
        self.conv2 = Conv(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = Norm(out_ch)
        self.stride, self.extra = stride, out_ch - in_ch

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride] if x.dim() == 3 else x[:, :, :: self.stride, :: self.stride]
        if self.extra:  # F.pad pads the last dimensions first: (L) or (W, H), then C
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """conv3 (`width` channels) -> BN -> ReLU, three stages of n basic blocks with `width`,
    2 x `width` and 4 x `width` channels (the second and third halve the size with stride 2),
    global average pool, linear: 6n + 2 layers with weights (`depth` 20, 32, 44, 56, 110 ...).

    A (C, L) input gets 1-D layers, a (C, H, W) input 2-D layers.
    """

    def __init__(self, in_shape: Sequence[int], num_outputs: int, *, depth: int, width: int) -> None:
        super().__init__()
        if len(in_shape) not in (2, 3):
            raise ConfigError(f"model=resnet needs (C, L) or (C, H, W) inputs, the dataset gives {tuple(in_shape)}")
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"model.depth={depth} is invalid: must be 6n + 2 for n >= 1 (8, 14, 20, 32, 44, 56, 110)")
        dims, n = len(in_shape) - 1, (depth - 2) // 6
        Conv, Norm = (nn.Conv1d, nn.Conv2d)[dims - 1], (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1]
        self.stem = nn.Sequential(Conv(in_shape[0], width, 3, padding=1, bias=False), Norm(width), nn.ReLU(inplace=True))
        blocks, in_ch = [], width
        for stage in range(3):
            out_ch = width * 2**stage
            for i in range(n):
                blocks.append(BasicBlock(in_ch, out_ch, 2 if stage > 0 and i == 0 else 1, dims))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[dims - 1](1)
        self.fc = nn.Linear(in_ch, num_outputs)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (B, 4 * width, L / 4) or (B, 4 * width, H / 4, W / 4)
        return self.fc(self.pool(x).flatten(1))
