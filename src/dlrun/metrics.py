"""What a model gets right and wrong on the test split, class by class (or output by output).

Every run's final test evaluation feeds its outputs to a `TestAnalysis` batch by batch (the same
pass that computes the test loss, see train.py `evaluate`): for classification torchmetrics'
per-class precision, recall and F1, macro/weighted F1, top-5 accuracy (more than 5 classes) and
the confusion matrix; for regression per-output MAE and RMSE (and the predictions, for the
scatter plot). The metric states stay on the device and are summed batch by batch; nothing is
read back until `result()`.

Conventions (torchmetrics'): an undefined ratio (a class never predicted has no precision, a
class with no test samples no recall) counts as 0; the macro average leaves out classes that
have neither test samples nor predictions, and the weighted average weighs by support.

torchmetrics is imported when an analysis is made, never on the CLI's start-up path. Under DDP
only rank 0 evaluates the test split (the whole of it), so the metrics never sync across ranks
(`sync_on_compute=False`: a sync there would wait for ranks that never evaluate).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

TOP_K = 5  # top-k accuracy is reported where there are more than this many classes
MOST_CONFUSED = 3  # pairs of classes named in the summary and the console table
MAX_SCATTER_POINTS = 5000  # predictions kept for the predicted-vs-true plot


class TestAnalysis(Protocol):
    def update(self, output: torch.Tensor, y: torch.Tensor) -> None: ...
    def result(self) -> tuple[dict[str, float], dict[str, Any]]: ...


def analysis_for(task: str, num_outputs: int, names: Sequence[str] | None, device: torch.device) -> TestAnalysis:
    """The analysis of a run's task: per class for classification, per output for regression."""
    if task == "regression":
        return OutputMetrics(num_outputs, device)
    return ClassMetrics(num_outputs, names, device)


def class_names(num_classes: int, names: Sequence[str] | None) -> list[str]:
    """The data's class names, or the class indices as names where it has none."""
    return [str(n) for n in names] if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


class ClassMetrics:
    """Per-class metrics and the confusion matrix of a classifier's outputs (logits), via torchmetrics.

    `result()` returns the scalars for the summary's best/final entries (`macro_f1`,
    `weighted_f1`, `top5_acc`) and the details: `per_class` (a dict per class with its name),
    `confusion_matrix` (rows: true class, columns: predicted; counts) and `most_confused`."""

    def __init__(self, num_classes: int, names: Sequence[str] | None, device: torch.device) -> None:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
            MulticlassPrecision,
            MulticlassRecall,
        )

        common = {"num_classes": num_classes, "validate_args": False, "sync_on_compute": False}
        metrics = {
            "precision": MulticlassPrecision(average="none", **common),
            "recall": MulticlassRecall(average="none", **common),
            "f1": MulticlassF1Score(average="none", **common),
            "macro_f1": MulticlassF1Score(average="macro", **common),
            "weighted_f1": MulticlassF1Score(average="weighted", **common),
            "confusion": MulticlassConfusionMatrix(**common),
        }
        if num_classes > TOP_K:
            metrics[f"top{TOP_K}_acc"] = MulticlassAccuracy(top_k=TOP_K, average="micro", **common)
        # compute groups: the precision/recall/F1 metrics share one set of per-class counts
        self.metrics = MetricCollection(metrics, compute_groups=True).to(device)
        self.names = class_names(num_classes, names)

    def update(self, output: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: logits (B, K) and labels (B,)."""
        self.metrics.update(output.detach().float(), y)

    def result(self) -> tuple[dict[str, float], dict[str, Any]]:
        values = {k: v.cpu() for k, v in self.metrics.compute().items()}
        confusion = values["confusion"].long()
        scalars = {k: float(values[k]) for k in values if k.endswith(("_f1", "_acc"))}
        per_class = [
            {"class": name, "precision": _short(p), "recall": _short(r), "f1": _short(f), "support": int(s),
             "predicted": int(n)}
            for name, p, r, f, s, n in zip(self.names, values["precision"], values["recall"], values["f1"],
                                           confusion.sum(1), confusion.sum(0))
        ]
        details = {"per_class": per_class, "confusion_matrix": confusion.tolist(),
                   "most_confused": most_confused(confusion, self.names)}
        return scalars, details


def _short(value: torch.Tensor) -> float:
    """A float32 metric as the summary shows it: 6 decimals, not float32's noise (0.9722222089767456)."""
    return round(float(value), 6)


def most_confused(confusion: torch.Tensor, names: Sequence[str], top: int = MOST_CONFUSED) -> list[dict[str, Any]]:
    """The `top` largest off-diagonal counts of a confusion matrix (rows true, columns predicted),
    as {true, predicted, count, rate}: rate is the share of the true class's samples; ties go to
    the lower class indices."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    support = confusion.sum(1)
    pairs = []
    for flat in torch.argsort(off.flatten(), descending=True, stable=True)[:top].tolist():
        true, predicted = divmod(flat, confusion.shape[1])
        count = int(off[true, predicted])
        if count == 0:
            break
        pairs.append({"true": names[true], "predicted": names[predicted], "count": count,
                      "rate": count / int(support[true])})
    return pairs


def macro_f1_of(confusion: Sequence[Sequence[int]]) -> float:
    """Macro F1 from a confusion matrix by the convention above (classes with neither samples nor
    predictions left out): the check that the summary's figures agree with its matrix."""
    matrix = torch.tensor(confusion, dtype=torch.float64)
    tp, support, predicted = matrix.diagonal(), matrix.sum(1), matrix.sum(0)
    denominator = support + predicted  # 2tp + fp + fn
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    present = denominator > 0
    return float(f1[present].mean()) if present.any() else 0.0


class OutputMetrics:
    """Per-output MAE and RMSE of a regression model, via torchmetrics, and a sample of the
    (true, predicted) pairs for the scatter plot."""

    def __init__(self, num_outputs: int, device: torch.device) -> None:
        from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

        common = {"num_outputs": num_outputs, "sync_on_compute": False}
        self.metrics = MetricCollection({"mae": MeanAbsoluteError(**common),
                                         "rmse": MeanSquaredError(squared=False, **common)}).to(device)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kept = 0

    def update(self, output: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: predictions and targets (B, K)."""
        output = output.detach().float()
        self.metrics.update(output, y)
        if self.kept < MAX_SCATTER_POINTS:
            take = MAX_SCATTER_POINTS - self.kept
            self.pairs.append((y[:take], output[:take]))
            self.kept += len(y[:take])

    def result(self) -> tuple[dict[str, float], dict[str, Any]]:
        values = {k: v.cpu().reshape(-1) for k, v in self.metrics.compute().items()}
        per_output = [{"output": i, "mae": float(m), "rmse": float(r)}
                      for i, (m, r) in enumerate(zip(values["mae"], values["rmse"]))]
        # the overall RMSE is over every (sample, output) value, like the MSE loss
        overall = float(values["rmse"].pow(2).mean().sqrt())
        return {"rmse": overall}, {"per_output": per_output}

    def predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(true, predicted), (n, K) each on the CPU: the first MAX_SCATTER_POINTS test samples."""
        if not self.pairs:
            return torch.empty(0), torch.empty(0)
        return torch.cat([t for t, _ in self.pairs]).cpu(), torch.cat([p for _, p in self.pairs]).cpu()
