"""Test-time augmentation (`dlrun-predict --tta flip`): a trained model's prediction averaged over its input and
the input's mirror image."""

from __future__ import annotations

import math

import torch
from torch import nn


class FlipTTA(nn.Module):
    """`model` on (N, C, H, W) images and on the same images flipped left to right, averaged. Classification:
    returns the log of the mean class probabilities, so that softmax gives the mean probabilities and
    cross-entropy is the loss of that mean; regression: the mean output."""

    def __init__(self, model: nn.Module, classification: bool) -> None:
        super().__init__()
        self.model, self.classification = model, classification

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen, mirrored = self.model(x), self.model(x.flip(-1))
        if not self.classification:
            return (seen + mirrored) / 2
        return torch.logsumexp(torch.stack([seen.log_softmax(1), mirrored.log_softmax(1)]), dim=0) - math.log(2)
