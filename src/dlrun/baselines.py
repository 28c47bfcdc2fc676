"""Trivial baselines for regression runs, on the same test split as the model.

- naive: repeat the last value of the input window for every predicted step (a forecast of one
  series: inputs (N, 1, L), targets (N, K));
- linear: an autoregression fitted by least squares (with a bias) on the training split's
  windows, `y ≈ [x, 1] @ W`.

Inputs reach the model normalised by the training split's statistics while targets stay in their
own units (see dlrun.data.build_data), and the model's MAE is measured on those targets; so are
these: the naive forecast undoes the normalisation of the last input value. Both are means over
every predicted value, as the model's (see dlrun.train.loss_and_score).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dlrun.data import Data, Split

MAX_LINEAR_FEATURES = 4096  # wider inputs (images) are left out: their least-squares fit would not be cheap


def _tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's inputs and targets as float64 CPU tensors: x (N, features...), y (N, K)."""
    xs, ys = zip(*split.batches(max(len(split), 1)))
    return torch.cat(xs).cpu().double(), torch.cat(ys).cpu().double()


def errors(prediction: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Mean absolute and mean squared error over every predicted value."""
    diff = prediction - y
    return {"mae": diff.abs().mean().item(), "mse": diff.pow(2).mean().item()}


def naive(x: torch.Tensor, horizon: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """The last input value (un-normalised with `mean`, `std`) repeated `horizon` times: x (N, 1, L) -> (N, K)."""
    last = x[:, 0, -1] * std + mean  # (N,)
    return last[:, None].expand(-1, horizon)


def fit_linear(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least-squares weights (features + 1, K) of `y ≈ [x, 1] @ W` (the last row is the bias)."""
    return torch.linalg.lstsq(_with_bias(x), y).solution


def predict_linear(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _with_bias(x) @ weights


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(len(x), -1)  # (N, C*L)
    return torch.cat([flat, torch.ones(len(x), 1, dtype=flat.dtype)], dim=1)


def baselines(data: Data) -> dict[str, dict[str, float]]:
    """Test MAE and MSE of the naive and linear baselines of a regression dataset ({} for
    classification); naive only for one series (inputs of shape (1, L)), linear only up to
    MAX_LINEAR_FEATURES input values."""
    spec = data.spec
    if spec.task != "regression":
        return {}
    x, y = _tensors(data.splits["test"])
    out: dict[str, dict[str, float]] = {}
    if len(spec.input_shape) == 2 and spec.input_shape[0] == 1:
        out["naive"] = errors(naive(x, y.shape[1], data.mean[0], data.std[0]), y)
    if math.prod(spec.input_shape) <= MAX_LINEAR_FEATURES:
        out["linear"] = errors(predict_linear(fit_linear(*_tensors(data.splits["train"])), x), y)
    return out


def compared(found: dict[str, dict[str, float]], best: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """Each baseline with the model's test MAE as a fraction of the baseline's, for the best and the
    final weights (`model_mae_ratio`: below 1 the model beats the baseline; 0.5 halves its error)."""
    out: dict[str, Any] = {}
    for name, scores in found.items():
        ratios = {which: metrics["test/mae"] / scores["mae"]
                  for which, metrics in (("best", best), ("final", final))
                  if "test/mae" in metrics and scores["mae"] > 0}
        out[name] = {**scores, "model_mae_ratio": ratios}
    return out
