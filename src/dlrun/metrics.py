"""What a model gets right and wrong on the test split, class by class (or output by output).

Every run's final test evaluation feeds its outputs to a `TestAnalysis` batch by batch (the same
pass that computes the test loss, see train.py `evaluate`). For classification it sums the
confusion matrix (and top-5 hits, with more than 5 classes) on the device; per-class precision,
recall, F1 and support, macro/weighted F1 and the most confused pairs follow from the matrix at
the end. For regression it sums each output's absolute and squared errors (and keeps a sample of
the predictions for the scatter plot). Nothing is read back from the device until `result()`.

Plain torch, not torchmetrics: importing torchmetrics (it imports torchvision and scipy.signal)
takes 0.5-1.3 s on this 2-core machine, 4-10% of the default run, while these figures are a few
lines from the confusion matrix. The conventions are torchmetrics' (tests/test_metrics.py checks
every figure against torchmetrics): an undefined ratio (a class never predicted has no precision,
a class with no test samples no recall) counts as 0; the macro average leaves out classes that
have neither test samples nor predictions; the weighted average weighs by support.

Under DDP only rank 0 evaluates the test split (the whole of it), so nothing needs summing over ranks.
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
    """The confusion matrix (and top-5 hits) of a classifier's outputs, summed on the device.

    `result()` returns the scalars for the summary's best/final entries (`macro_f1`,
    `weighted_f1`, `top5_acc`) and the details: `per_class` (a dict per class with its name),
    `confusion_matrix` (rows: true class, columns: predicted; counts) and `most_confused`."""

    def __init__(self, num_classes: int, names: Sequence[str] | None, device: torch.device) -> None:
        self.k = num_classes
        self.names = class_names(num_classes, names)
        self.counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
        self.top_hits = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0

    def update(self, output: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: logits (B, K) and labels (B,)."""
        output = output.detach()
        self.counts += torch.bincount(y * self.k + output.argmax(dim=1), minlength=self.k * self.k)
        if self.k > TOP_K:
            self.top_hits += (output.topk(TOP_K, dim=1).indices == y[:, None]).any(dim=1).sum()
        self.seen += len(y)

    def result(self) -> tuple[dict[str, float], dict[str, Any]]:
        confusion = self.counts.view(self.k, self.k).cpu()
        per_class, scalars = class_scores(confusion)
        if self.k > TOP_K:
            scalars[f"top{TOP_K}_acc"] = int(self.top_hits) / max(self.seen, 1)
        rows = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {"class": name}
            row.update({k: _short(v[i]) if v.is_floating_point() else int(v[i]) for k, v in per_class.items()})
            rows.append(row)
        details = {"per_class": rows, "confusion_matrix": confusion.tolist(),
                   "most_confused": most_confused(confusion, self.names)}
        return scalars, details


def class_scores(confusion: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per-class precision, recall, F1, support and predicted counts of a confusion matrix (rows
    true, columns predicted), and its macro and weighted F1, by the conventions above."""
    matrix = confusion.double()
    tp, support, predicted = matrix.diagonal(), matrix.sum(dim=1), matrix.sum(dim=0)

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    f1 = ratio(2 * tp, support + predicted)  # = 2PR / (P + R) = 2tp / (2tp + fp + fn)
    present = (support + predicted) > 0
    per_class = {"precision": ratio(tp, predicted), "recall": ratio(tp, support), "f1": f1,
                 "support": support.long(), "predicted": predicted.long()}
    scalars = {"macro_f1": float(f1[present].mean()) if present.any() else 0.0,
               "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() > 0 else 0.0}
    return per_class, scalars


def _short(value: torch.Tensor) -> float:
    """A metric as the summary shows it: 6 decimals."""
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


class OutputMetrics:
    """Per-output MAE and RMSE of a regression model (sums of absolute and squared errors on the
    device), and a sample of the (true, predicted) pairs for the scatter plot."""

    def __init__(self, num_outputs: int, device: torch.device) -> None:
        self.sums = torch.zeros(2, num_outputs, dtype=torch.float64, device=device)  # |e|, e^2 per output
        self.seen = 0
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kept = 0

    def update(self, output: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: predictions and targets (B, K)."""
        output = output.detach().float()
        errors = (output - y).double()
        self.sums += torch.stack([errors.abs().sum(dim=0), errors.pow(2).sum(dim=0)])
        self.seen += len(y)
        if self.kept < MAX_SCATTER_POINTS:
            take = MAX_SCATTER_POINTS - self.kept
            self.pairs.append((y[:take], output[:take]))
            self.kept += len(y[:take])

    def result(self) -> tuple[dict[str, float], dict[str, Any]]:
        mae, mse = (self.sums / max(self.seen, 1)).cpu()
        per_output = [{"output": i, "mae": float(m), "rmse": float(r)} for i, (m, r) in enumerate(zip(mae, mse.sqrt()))]
        # the overall RMSE is over every (sample, output) value, like the MSE loss
        return {"rmse": float(mse.mean().sqrt())}, {"per_output": per_output}

    def predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(true, predicted), (n, K) each on the CPU: the first MAX_SCATTER_POINTS test samples."""
        if not self.pairs:
            return torch.empty(0), torch.empty(0)
        return torch.cat([t for t, _ in self.pairs]).cpu(), torch.cat([p for _, p in self.pairs]).cpu()
