"""Per-class test metrics (metrics.py), their pictures (charts.py) and the run's summary of them."""

from __future__ import annotations

import io
import math
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import read_summary
from dlrun import charts
from dlrun.data import TensorSplit
from dlrun.rundir import write_bytes
from dlrun.metrics import ClassMetrics, OutputMetrics, analysis_for, most_confused
from dlrun.train import evaluate

CPU = torch.device("cpu")


def macro_f1_of(confusion) -> float:
    """Macro F1 recomputed from a confusion matrix (rows true, columns predicted) with numpy: the
    mean F1 = 2tp / (support + predicted) over the classes that have samples or predictions."""
    matrix = np.asarray(confusion, dtype=float)
    tp, support, predicted = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    present = support + predicted > 0
    return float(np.mean(2 * tp[present] / (support + predicted)[present])) if present.any() else 0.0


def logits_for(predicted: list[int], k: int) -> torch.Tensor:
    """Logits whose argmax is `predicted` (and whose ranking is otherwise by class index)."""
    out = -torch.arange(k, dtype=torch.float32).repeat(len(predicted), 1) / k
    out[torch.arange(len(predicted)), predicted] = 5.0
    return out


def analysed(y: list[int], logits: torch.Tensor, k: int, names=None, batches: int = 2):
    metrics = ClassMetrics(k, names, CPU)
    for part_y, part_x in zip(torch.tensor(y).tensor_split(batches), logits.tensor_split(batches)):
        metrics.update(part_x, part_y)
    return metrics.result()


def test_per_class_metrics_by_hand_with_a_class_that_never_occurs():
    # class 3 never occurs and is never predicted; class 4 never occurs but is predicted once
    y = [0, 0, 1, 1, 2, 2, 2]
    predicted = [0, 1, 1, 1, 2, 2, 4]
    scalars, details = analysed(y, logits_for(predicted, 5), 5, names=["a", "b", "c", "d", "e"])
    assert details["confusion_matrix"] == [[1, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 2, 0, 1], [0] * 5, [0] * 5]
    rows = {r["class"]: r for r in details["per_class"]}
    expected = {  # precision, recall, F1, support, predicted
        "a": (1.0, 0.5, 2 / 3, 2, 1), "b": (2 / 3, 1.0, 0.8, 2, 3), "c": (1.0, 2 / 3, 0.8, 3, 2),
        "d": (0.0, 0.0, 0.0, 0, 0), "e": (0.0, 0.0, 0.0, 0, 1),
    }
    for name, (p, r, f1, support, n) in expected.items():
        row = rows[name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f1), abs=1e-6), name
        assert (row["support"], row["predicted"]) == (support, n)
    # macro: the four classes with samples or predictions ("d" has neither and is left out)
    assert scalars["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.8 + 0.0) / 4, abs=1e-6)
    assert scalars["weighted_f1"] == pytest.approx((2 * 2 / 3 + 2 * 0.8 + 3 * 0.8) / 7, abs=1e-6)
    assert "top5_acc" not in scalars  # only with more than 5 classes
    assert macro_f1_of(details["confusion_matrix"]) == pytest.approx(scalars["macro_f1"], abs=1e-6)
    assert details["most_confused"] == [
        {"true": "a", "predicted": "b", "count": 1, "rate": 0.5},
        {"true": "c", "predicted": "e", "count": 1, "rate": pytest.approx(1 / 3)},
    ]


def test_perfect_predictions():
    y = [i % 7 for i in range(21)]
    scalars, details = analysed(y, logits_for(y, 7), 7)
    assert scalars == {"macro_f1": pytest.approx(1.0), "weighted_f1": pytest.approx(1.0), "top5_acc": pytest.approx(1.0)}
    assert details["confusion_matrix"] == (3 * np.eye(7, dtype=int)).tolist()
    assert all(r["f1"] == 1.0 and r["support"] == 3 for r in details["per_class"])
    assert [r["class"] for r in details["per_class"]] == [str(i) for i in range(7)]  # no names: the indices
    assert details["most_confused"] == []


def test_all_wrong_predictions_and_top_k():
    y = [i % 7 for i in range(14)]
    logits = torch.zeros(14, 7)
    for i, label in enumerate(y):  # the true class ranks last: predicted (label + 1), then the rest
        logits[i] = torch.arange(7, 0, -1).roll((label + 1) % 7).float()
        logits[i, label] = -10.0
    scalars, details = analysed(y, logits, 7)
    assert scalars["macro_f1"] == 0.0 and scalars["weighted_f1"] == 0.0 and scalars["top5_acc"] == 0.0
    assert sum(map(sum, details["confusion_matrix"])) == 14
    assert all(details["confusion_matrix"][c][(c + 1) % 7] == 2 for c in range(7))
    assert details["most_confused"][0] == {"true": "0", "predicted": "1", "count": 2, "rate": 1.0}


def test_top_5_accuracy_by_hand():
    # six classes; the true class ranks 1st, 3rd, 6th and 5th: 3 of 4 within the top 5
    order = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    logits = order.repeat(4, 1)
    scalars, _ = analysed([0, 2, 5, 4], logits, 6, batches=1)
    assert scalars["top5_acc"] == pytest.approx(0.75)


@pytest.mark.parametrize("seed, k", [(0, 6), (1, 6), (2, 12), (3, 3)])
def test_every_figure_agrees_with_torchmetrics(seed, k):
    """torchmetrics, the field's reference, as the oracle (the run computes the same in plain torch)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy, multiclass_confusion_matrix, multiclass_f1_score, multiclass_precision,
        multiclass_recall)

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k - 1, (300,), generator=g)  # the last class never occurs
    logits = torch.randn(300, k, generator=g) + 1.5 * F.one_hot(y, k)
    logits[:5, k - 1] = 10.0  # ... but is predicted a few times
    scalars, details = analysed(y.tolist(), logits, k, batches=4)
    assert details["confusion_matrix"] == multiclass_confusion_matrix(logits, y, k).tolist()
    for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score)):
        expected = fn(logits, y, k, average="none").tolist()
        assert [r[name] for r in details["per_class"]] == pytest.approx(expected, abs=1e-6), name
    assert scalars["macro_f1"] == pytest.approx(float(multiclass_f1_score(logits, y, k, average="macro")), abs=1e-6)
    assert scalars["weighted_f1"] == pytest.approx(float(multiclass_f1_score(logits, y, k, average="weighted")),
                                                   abs=1e-6)
    if k > 5:
        top5 = float(multiclass_accuracy(logits, y, k, top_k=5, average="micro"))
        assert scalars["top5_acc"] == pytest.approx(top5, abs=1e-6)
    assert macro_f1_of(details["confusion_matrix"]) == pytest.approx(scalars["macro_f1"], abs=1e-6)


def test_most_confused_breaks_ties_by_class_index_and_skips_zeros():
    confusion = torch.tensor([[5, 2, 0], [0, 4, 2], [1, 0, 3]])
    pairs = most_confused(confusion, ["x", "y", "z"], top=5)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("x", "y", 2), ("y", "z", 2), ("z", "x", 1)]


def test_regression_per_output_errors_by_hand():
    metrics = OutputMetrics(2, CPU)
    metrics.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]]))
    metrics.update(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 1.0]]))
    scalars, details = metrics.result()
    assert details["per_output"] == [
        {"output": 0, "mae": pytest.approx(1.0), "rmse": pytest.approx(math.sqrt(2))},
        {"output": 1, "mae": pytest.approx(2.0), "rmse": pytest.approx(math.sqrt(5))},
    ]
    assert scalars["rmse"] == pytest.approx(math.sqrt((0 + 4 + 1 + 9) / 4))
    true, predicted = metrics.predictions()
    assert true.tolist() == [[1.0, 1.0], [1.0, 1.0]] and predicted.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_the_evaluation_pass_feeds_every_test_sample_to_the_analysis():
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(103, 4, generator=g), torch.randint(0, 3, (103,), generator=g))
    model = torch.nn.Linear(4, 3)
    analysis = analysis_for("classification", 3, ["r", "g", "b"], CPU)
    scores = evaluate(model, split, batch_size=10, observe=analysis.update)
    _, details = analysis.result()
    matrix = np.array(details["confusion_matrix"])
    assert matrix.sum() == 103
    assert np.trace(matrix) / 103 == pytest.approx(scores["acc"])
    assert [r["support"] for r in details["per_class"]] == torch.bincount(split.y, minlength=3).tolist()


@pytest.mark.parametrize("k", [3, 40])
def test_confusion_matrix_png(tmp_path, k):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 5, (k, k)) + 20 * np.eye(k, dtype=int)
    matrix[0] = 0  # a class with no test samples: an empty row, not a division by zero
    names = [f"c{i}" for i in range(k)]
    path = write_bytes(tmp_path / "plots" / "cm.png", charts.confusion_matrix(matrix.tolist(), names, "t"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 420 and image.size[1] > 16 * k + 100
        colours = {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    # the diagonal's share (20 of ~30 at k=3, of ~100 at k=40) is drawn in its own colour
    share = matrix[1, 1] / matrix[1].sum()
    assert tuple(charts.blues(np.array(share))) in colours


def test_the_colour_scale_runs_from_white_to_dark_blue_on_a_square_root_scale():
    scale = charts.blues(np.linspace(0, 1, 101))
    assert scale[0].tolist() == [247, 251, 255] and scale[-1].tolist() == [8, 48, 107]
    assert np.all(np.diff(scale.astype(int).sum(axis=1)) <= 0)  # darker as the share grows
    assert charts.blues(np.array(0.25)).tolist() == charts.BLUES[4].astype(int).tolist()  # sqrt(0.25): halfway


def test_ticks_are_round_numbers_inside_the_range():
    assert charts.nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert charts.nice_ticks(0.13, 2.2) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert charts.nice_ticks(0.3, 15.7, 6, integer=True) == [5, 10, 15]
    assert charts.nice_ticks(0.95, 2.05, 6, integer=True) == [1, 2]  # epochs: never half an epoch
    assert charts.tick_label(0.5, [0.5, 1.0]) == "0.5" and charts.tick_label(10.0, [5.0, 10.0]) == "10"


def test_learning_curves_png_leave_out_diverged_epochs(tmp_path):
    records = [{"epoch": e, "train/loss": 1 / e, "val/loss": 1.1 / e, "train/acc": 0.5, "val/acc": 0.4}
               for e in (1, 2, 3)]
    records[2]["train/loss"] = float("nan")
    assert charts.curves(records, "loss") == {"train": [(1, 1.0), (2, 0.5)], "val": [(1, 1.1), (2, 0.55), (3, 1.1 / 3)]}
    with Image.open(io.BytesIO(charts.learning_curves(records, 2, "t"))) as image:
        assert image.format == "PNG" and image.width == 1000 and image.height == 380  # a panel per metric


def test_a_legend_keeps_clear_of_the_lines_and_the_best_epoch():
    canvas = charts.Canvas((500, 380))
    panel = charts.Panel(canvas, (70, 30, 485, 335), [1, 10], [0.0, 1.0], integer_x=True)
    panel.plot([(1, 0.0), (10, 1.0)], charts.TAB10[0])  # bottom left to top right
    assert any(math.dist(p, panel.at(5.5, 0.5)) < 8 for p in panel.points)  # the line between the markers counts
    assert panel.legend([("train", charts.TAB10[0], "line")])[0] < 200  # top left
    panel.vertical_dotted(1.5, (128, 128, 128))  # now the left side is taken too
    x, y = panel.legend([("train", charts.TAB10[0], "line")])
    assert x > 200 and y > 200  # bottom right


def test_predicted_vs_true_png(tmp_path):
    true = np.linspace(-1, 1, 60).reshape(20, 3)
    path = write_bytes(tmp_path / "p.png", charts.predicted_vs_true(true, true + 0.1, "t"))
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - charts.hex_rgb(charts.TAB10[1])).sum(axis=1) < 60).any()  # output 1's points


# ------------------------------------------------------------ end to end


def run_dlrun(cwd, data_dir, *args: str) -> subprocess.CompletedProcess:
    from conftest import DLRUN

    import os

    return subprocess.run([DLRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DLRUN_DATA_DIR": str(data_dir), "COLUMNS": "200"})


@pytest.mark.slow
def test_a_default_run_reports_per_class_metrics(tmp_path, data_dir):
    proc = run_dlrun(tmp_path, data_dir, "hydra.run.dir=run", "trainer.epochs=2")
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(tmp_path / "run")
    classes = summary["classes"]
    assert classes["names"] == [str(d) for d in range(10)]
    for which in ("best", "final"):
        details, results = classes[which], summary[which]
        matrix = np.array(details["confusion_matrix"])
        assert matrix.shape == (10, 10) and matrix.sum() == summary["data"]["sizes"]["test"]
        assert np.trace(matrix) / matrix.sum() == pytest.approx(results["test/acc"])
        assert results["test/macro_f1"] == pytest.approx(macro_f1_of(details["confusion_matrix"]), abs=1e-5)
        assert [r["support"] for r in details["per_class"]] == matrix.sum(axis=1).tolist()
        assert 0.0 < results["test/weighted_f1"] <= 1.0 and results["test/top5_acc"] >= results["test/acc"]
    pair = classes["best"]["most_confused"][0]
    assert f"{pair['true']}→{pair['predicted']} ×{pair['count']}" in proc.stdout  # the console table
    assert (tmp_path / "run" / "plots" / "confusion_matrix.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_regression_run_reports_per_output_errors(tmp_path, data_dir):
    proc = run_dlrun(tmp_path, data_dir, "hydra.run.dir=run", "dataset=sequence", "model=mlp", "trainer.epochs=2")
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(tmp_path / "run")
    outputs = summary["outputs"]["best"]["per_output"]
    assert len(outputs) == summary["data"]["num_outputs"]
    # the per-output MAEs average to the run's test MAE (both are means over samples and outputs)
    assert np.mean([o["mae"] for o in outputs]) == pytest.approx(summary["best"]["test/mae"], rel=1e-4)
    assert summary["best"]["test/rmse"] == pytest.approx(np.sqrt(np.mean([o["rmse"] ** 2 for o in outputs])), rel=1e-5)
    assert "classes" not in summary
    assert (tmp_path / "run" / "plots" / "predicted_vs_true.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_ddp_run_analyses_the_whole_test_split(tmp_path, data_dir):
    proc = run_dlrun(tmp_path, data_dir, "hydra.run.dir=run", "trainer.devices=2", "trainer.epochs=1", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(tmp_path / "run")
    matrix = np.array(summary["classes"]["final"]["confusion_matrix"])
    assert matrix.sum() == summary["data"]["sizes"]["test"] == 359  # every test sample, not one rank's share
    assert np.trace(matrix) / matrix.sum() == pytest.approx(summary["final"]["test/acc"])
