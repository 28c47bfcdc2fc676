"""Per-class test metrics (metrics.py), their pictures (plots.py) and the run's summary of them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CPU, read_summary
from dlrun import plots
from dlrun.data import TensorSplit
from dlrun.metrics import ClassMetrics, OutputMetrics, analysis_for, most_confused
from dlrun.train import evaluate

DEVICE = torch.device("cpu")


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
    metrics = ClassMetrics(k, names, DEVICE)
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
    metrics = OutputMetrics(2, DEVICE)
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
    analysis = analysis_for("classification", 3, ["r", "g", "b"], DEVICE)
    scores = evaluate(model, split, batch_size=10, observe=analysis.update)
    _, details = analysis.result()
    matrix = np.array(details["confusion_matrix"])
    assert matrix.sum() == 103
    assert np.trace(matrix) / 103 == pytest.approx(scores["acc"])
    assert [r["support"] for r in details["per_class"]] == torch.bincount(split.y, minlength=3).tolist()


# ------------------------------------------------------------ pictures (plots.py)


def rendered(fig, path: Path) -> np.ndarray:
    """The figure as `plots.save` writes it: the PNG's RGB pixels, (H, W, 3), as ints."""
    with Image.open(plots.save(fig, path)) as image:
        assert image.format == "PNG"
        assert image.size == tuple(round(v * plots.DPI) for v in fig.get_size_inches())
        return np.asarray(image.convert("RGB")).astype(int)


def pixels_at(pixels: np.ndarray, ax, x: float, y: float, around: int = 0) -> np.ndarray:
    """The rendered pixels within `around` pixels of data coordinates (x, y) of `ax`, as (n, 3) (display y runs
    upwards, image rows down)."""
    column, row = ax.transData.transform((x, y))
    row, column = int(pixels.shape[0] - row), int(column)
    return pixels[row - around:row + around + 1, column - around:column + around + 1].reshape(-1, 3)


def confusion_case(k: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 5, (k, k)) + 20 * np.eye(k, dtype=int)
    matrix[0] = 0  # a class with no test samples: an empty row, not a division by zero
    return matrix, [f"c{i}" for i in range(k)]


def blues(share) -> np.ndarray:
    """matplotlib's Blues at the square root of the share, as 0..255 RGB."""
    import matplotlib

    return np.asarray(matplotlib.colormaps["Blues"](np.sqrt(share)))[..., :3] * 255


@pytest.mark.parametrize("k", [3, 40])
def test_confusion_matrix_colours_each_cell_by_its_share_of_the_true_class(tmp_path, k):
    matrix, names = confusion_case(k)
    fig = plots.confusion_matrix(matrix.tolist(), names, "t")
    pixels = rendered(fig, tmp_path / "plots" / "cm.png")  # save makes the folder
    ax = fig.axes[0]
    support = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, support, out=np.zeros(matrix.shape), where=support > 0)
    np.testing.assert_allclose(ax.images[0].get_array(), shares)
    cell = np.abs(np.diff(ax.transData.transform([(0, 0), (1, 1)]), axis=0))
    assert (cell >= 16).all()  # pixels per cell: the picture grows with the classes
    # every cell, rendered, in the colour of its share (off the cell's centre, where a count may be written);
    # the empty row is white
    for (i, j), share in np.ndenumerate(shares):
        assert np.abs(pixels_at(pixels, ax, j - 0.3, i - 0.3)[0] - blues(share)).max() <= 2, (i, j)
    assert (pixels_at(pixels, ax, 0.3, 0.3) >= 245).all()


def test_the_colour_scale_runs_from_white_to_dark_blue_on_a_square_root_scale():
    matrix, names = confusion_case(3)
    fig = plots.confusion_matrix(matrix.tolist(), names, "t")
    image, bar = fig.axes[0].images[0], fig.axes[1]
    scale = image.to_rgba(np.linspace(0, 1, 101), bytes=True)[:, :3].astype(int)
    assert scale[0].tolist() == [247, 251, 255] and scale[-1].tolist() == [8, 48, 107]
    assert np.all(np.diff(scale.sum(axis=1)) <= 0)  # darker as the share grows
    assert np.abs(scale[25] - blues(0.25)).max() <= 1  # sqrt(0.25): halfway along the colour map
    assert bar.get_ylim() == (0.0, 1.0) and bar.get_ylabel() == "share of the true class"  # the colour bar


@pytest.mark.parametrize("k", [3, 20, 21, 40])
def test_confusion_matrix_writes_counts_up_to_20_classes_and_names_every_class(k):
    matrix, names = confusion_case(k)
    ax = plots.confusion_matrix(matrix.tolist(), names, "t").axes[0]
    written = {(t.get_position(), t.get_text()) for t in ax.texts}
    if k <= 20:
        assert written == {((j, i), str(n)) for (i, j), n in np.ndenumerate(matrix) if n}  # zeros left blank
        colours = {t.get_position(): t.get_color() for t in ax.texts}
        assert colours[(1, 1)] == "white"  # on the dark diagonal
        assert colours[next((j, 1) for j in range(k) if j != 1 and matrix[1, j])] == "black"
    else:
        assert written == set()
    assert [t.get_text() for t in ax.get_xticklabels()] == names == [t.get_text() for t in ax.get_yticklabels()]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")


def test_learning_curves_leave_out_diverged_epochs_with_whole_epochs_and_the_best_marked():
    records = [{"epoch": e, "train/loss": 1 / e, "val/loss": 1.1 / e, "train/acc": 0.5, "val/acc": 0.4}
               for e in (1, 2, 3)]
    records[2]["train/loss"] = float("nan")
    fig = plots.learning_curves([{"run": "r", "overrides": "", "records": [records]}], "acc", "t", best_epoch=2)
    fig.canvas.draw()
    loss, acc = fig.axes  # a panel per metric
    lines = {line.get_linestyle(): line.get_xydata().tolist() for line in loss.lines}
    assert lines["--"] == [[1, 1.0], [2, 0.5]]  # train, without the NaN epoch
    np.testing.assert_allclose(lines["-"], [[1, 1.1], [2, 0.55], [3, 1.1 / 3]])  # val
    assert [line.get_xdata()[0] for ax in (loss, acc) for line in ax.lines if line.get_linestyle() == ":"] == [2, 2]
    assert acc.get_ylabel().startswith("acc") and loss.get_ylabel().startswith("loss")
    low, high = loss.get_xlim()
    ticks = [t for t in loss.get_xticks() if low <= t <= high]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)  # epochs: never half an epoch


def test_the_legend_of_learning_curves_keeps_clear_of_the_lines_and_the_best_epoch():
    records = [{"epoch": e, "train/loss": 1 / e, "val/loss": 1.1 / e, "train/acc": e / 10, "val/acc": e / 11}
               for e in range(1, 11)]
    fig = plots.learning_curves([{"run": "r", "overrides": "", "records": [records]}], "acc", "t", best_epoch=10)
    fig.canvas.draw()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["val", "train", "best epoch (10)"]
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)  # beside the panels, not on them


def test_predicted_vs_true_draws_every_point_in_its_outputs_colour_and_the_diagonal(tmp_path):
    true = np.linspace(-1, 1, 60).reshape(20, 3)
    predicted = true + 0.1
    fig = plots.predicted_vs_true(true, predicted, "t")
    pixels = rendered(fig, tmp_path / "p.png")
    ax = fig.axes[0]
    points = ax.collections
    assert len(points) == 3  # a scatter per output
    for j, collection in enumerate(points):
        np.testing.assert_allclose(collection.get_offsets(), np.stack([true[:, j], predicted[:, j]], 1))
    (diagonal,) = ax.lines
    assert diagonal.get_xydata().tolist() == [[-1.0, -1.0], [1.1, 1.1]]  # predicted = true, over the values' range
    assert ax.get_legend_handles_labels()[1] == ["output 0", "output 1", "output 2", "predicted = true"]
    (legend,) = fig.legends  # beside the plot: it hides no point
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())
    # rendered: each point's centre is nearest to its own output's colour (half transparent over white), the
    # diagonal is dark
    colours = np.array([255 * (c.get_facecolor()[0][:3] * c.get_alpha() + 1 - c.get_alpha()) for c in points])
    for (i, j), (x, y) in zip(np.ndindex(true.shape), zip(true.flat, predicted.flat)):
        (found,) = pixels_at(pixels, ax, x, y)
        assert np.argmin(np.abs(colours - found).sum(axis=1)) == j and found.sum() < 3 * 245, (i, j)
    for value in (-0.5, 0.05, 0.6):  # a line thinner than two pixels: one of the 3x3 around its point
        assert pixels_at(pixels, ax, value, value, around=1).max(axis=1).min() < 100


# ------------------------------------------------------------ end to end


def pictures(folder: Path) -> set[str]:
    """The PNGs in a run's plots/, each checked to be a real picture of some size."""
    found = set()
    for path in (folder / "plots").glob("*.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 300, path
        assert path.stat().st_size > 10_000, path
        found.add(path.name)
    return found


def test_a_classification_run_reports_per_class_metrics_and_draws_its_pictures_when_asked(cli, tmp_path):
    ran = cli("dlrun", "hydra.run.dir=run", "trainer.epochs=2", "logger.plots=true", *CPU, check=True)
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
    assert f"{pair['true']}→{pair['predicted']} ×{pair['count']}" in ran.stdout  # the console table
    assert pictures(tmp_path / "run") == {"confusion_matrix.png", "learning_curves.png"}


def test_a_regression_run_reports_per_output_errors_and_draws_its_pictures_when_asked(trained):
    folder = trained("dataset=sequence", "model=mlp", "trainer.epochs=2", "logger.plots=true", *CPU)
    summary = read_summary(folder)
    outputs = summary["outputs"]["best"]["per_output"]
    assert len(outputs) == summary["data"]["num_outputs"]
    # the per-output MAEs average to the run's test MAE (both are means over samples and outputs)
    assert np.mean([o["mae"] for o in outputs]) == pytest.approx(summary["best"]["test/mae"], rel=1e-4)
    assert summary["best"]["test/rmse"] == pytest.approx(np.sqrt(np.mean([o["rmse"] ** 2 for o in outputs])), rel=1e-5)
    assert "classes" not in summary
    assert pictures(folder) == {"predicted_vs_true.png", "learning_curves.png"}


def test_a_run_draws_no_pictures_by_default(trained):
    assert not list(trained("trainer.epochs=1", *CPU).rglob("*.png"))


@pytest.mark.slow
def test_a_ddp_run_analyses_the_whole_test_split(dlrun_cli, tmp_path):
    dlrun_cli("hydra.run.dir=run", "trainer.devices=2", "trainer.epochs=1", *CPU, check=True)
    summary = read_summary(tmp_path / "run")
    matrix = np.array(summary["classes"]["final"]["confusion_matrix"])
    assert matrix.sum() == summary["data"]["sizes"]["test"] == 359  # every test sample, not one rank's share
    assert np.trace(matrix) / matrix.sum() == pytest.approx(summary["final"]["test/acc"])
