"""The pictures of what a model gets wrong and why: the confusion matrix and the predicted-vs-true
scatter every run draws at its end (see metrics.py), and dlrun-explain's attribution grids and
misclassified examples (see tools/explain.py).

Inputs arrive as plain arrays (numpy or lists), never tensors on a device. matplotlib (Agg, files
only) is imported inside the functions, so the CLI path stays light; every PNG is written
atomically through the run folder's one write.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dlrun.rundir import atomic_write

ANNOTATE_UP_TO = 20  # classes: beyond this the confusion matrix shows colours only
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Render to PNG in memory, then write it atomically; closes the figure."""
    plt = _pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return path


# ------------------------------------------------------------ every run


def confusion_matrix(path: Path, matrix: Sequence[Sequence[int]], names: Sequence[str], title: str) -> Path:
    """Rows (true classes) normalised to sum 1 and coloured by that share; the counts written in the
    cells when there are at most ANNOTATE_UP_TO classes; class names on both axes (smaller with many)."""
    plt = _pyplot()
    from matplotlib.colors import PowerNorm

    counts = np.asarray(matrix, dtype=np.int64)
    k = len(names)
    support = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    side = min(5.0 + 0.16 * k, 22.0)
    font = max(5.0, min(10.0, 0.5 * 72 * 0.85 * side / max(k, 1)))  # half a cell high, in points
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    # margins for the longest class name, set by hand: tight_layout would draw the figure twice
    # (a third of the run's cost of this picture)
    label = (max(map(len, names), default=1) * 0.6 * font + 24) / 72 / side  # inches of text, as a share
    fig.subplots_adjust(left=min(0.08 + label, 0.4), bottom=min(0.08 + label, 0.4), right=0.86, top=0.93)
    # a square-root colour scale, so that confusions of a few percent still show among 100 classes
    image = ax.imshow(shares, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="share of the true class")
    ax.set_xticks(range(k), labels=names, rotation=90, fontsize=font)
    ax.set_yticks(range(k), labels=names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= ANNOTATE_UP_TO:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=min(9.0, font),
                        color="white" if shares[i, j] > 0.4 else "black")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def predicted_vs_true(path: Path, true: np.ndarray, predicted: np.ndarray, title: str) -> Path:
    """Each (sample, output) as a point, predicted against true, coloured by output; the diagonal
    is a perfect prediction."""
    plt = _pyplot()
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    true, predicted = true.reshape(len(true), -1), predicted.reshape(len(predicted), -1)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    outputs = true.shape[1] if true.size else 0
    colours = plt.get_cmap("viridis", max(outputs, 1))
    for j in range(outputs):
        ax.scatter(true[:, j], predicted[:, j], s=6, alpha=0.5, color=colours(j),
                   label=f"output {j}" if outputs <= 10 else None)
    if true.size:
        low, high = float(min(true.min(), predicted.min())), float(max(true.max(), predicted.max()))
        ax.plot([low, high], [low, high], color="black", linewidth=1, label="predicted = true")
    ax.set_xlabel("true value")
    ax.set_ylabel("predicted value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", markerscale=2)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------ dlrun-explain


def _display(x: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A (C, H, W) input as imshow shows it: grey (H, W) for one channel, RGB (H, W, 3) in 0..1
    for three (scaled by its own range), the channels' mean otherwise."""
    if x.shape[0] == 3:
        rgb = np.moveaxis(x, 0, -1)
        span = rgb.max() - rgb.min()
        return (rgb - rgb.min()) / (span if span > 0 else 1.0), None
    return x.mean(axis=0), "gray"


def _grid(plt: Any, n: int, per_row: int, cell: tuple[float, float]) -> tuple[Any, np.ndarray]:
    rows = max(1, math.ceil(n / per_row))
    fig, axes = plt.subplots(rows, per_row, figsize=(cell[0] * per_row, cell[1] * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def _overlay(plt: Any, heat: np.ndarray) -> np.ndarray:
    """An (H, W, 4) RGBA layer: red for positive, blue for negative attribution, as opaque as the value
    is large (zero is transparent, so the input shows through)."""
    bound = float(np.abs(heat).max()) or 1.0
    rgba = plt.get_cmap("bwr")(0.5 + 0.5 * heat / bound)
    rgba[..., 3] = 0.9 * np.abs(heat) / bound
    return rgba


def attribution_images(path: Path, inputs: np.ndarray, maps: np.ndarray, captions: Sequence[tuple[str, str]],
                       title: str) -> Path:
    """For each example two panels: the input (captioned with its true label) and the attribution
    map summed over channels, in red (pushes towards the target) and blue (away from it) over the
    input in grey (captioned with the prediction). Four examples per row."""
    plt = _pyplot()
    n = len(inputs)
    pairs = min(4, max(n, 1))
    fig, axes = _grid(plt, 2 * n, 2 * pairs, (2.1, 2.6))
    for i in range(n):
        image, cmap = _display(inputs[i])
        left, right = axes.flat[2 * i], axes.flat[2 * i + 1]
        left.imshow(image, cmap=cmap)
        right.imshow(inputs[i].mean(axis=0), cmap="gray")
        right.imshow(_overlay(plt, maps[i].sum(axis=0)))
        for ax, caption in zip((left, right), captions[i]):
            ax.set_title(caption, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def attribution_signals(path: Path, inputs: np.ndarray, maps: np.ndarray, captions: Sequence[tuple[str, str]],
                        title: str) -> Path:
    """For each example the signal (C, L: a line per channel) over a band coloured by the attribution
    per step (summed over channels): red pushes towards the target, blue away from it. Two per row."""
    plt = _pyplot()
    n = len(inputs)
    per_row = 2 if n > 1 else 1
    fig, axes = _grid(plt, n, per_row, (5.2, 2.4))
    for i in range(n):
        ax, signal, steps = axes.flat[i], inputs[i], maps[i].sum(axis=0)
        bound = float(np.abs(steps).max()) or 1.0
        low, high = float(signal.min()), float(signal.max())
        pad = 0.1 * (high - low or 1.0)
        band = ax.imshow(steps[None, :], aspect="auto", cmap="bwr", vmin=-bound, vmax=bound, alpha=0.55,
                         extent=(-0.5, signal.shape[1] - 0.5, low - pad, high + pad), interpolation="nearest")
        for channel in signal:
            ax.plot(np.arange(signal.shape[1]), channel, color="black", linewidth=1.2)
        ax.set_xlim(-0.5, signal.shape[1] - 0.5)
        ax.set_title("   ".join(captions[i]), fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(band, ax=ax, pad=0.01, fraction=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def examples(path: Path, inputs: np.ndarray, captions: Sequence[str], title: str) -> Path:
    """A grid of inputs (images, or signals drawn as lines), each with its caption; six per row."""
    plt = _pyplot()
    n = len(inputs)
    images = inputs.ndim == 4
    per_row = min(6, max(n, 1))
    fig, axes = _grid(plt, max(n, 1), per_row, (2.0, 2.2) if images else (3.0, 1.9))
    for i in range(n):
        ax = axes.flat[i]
        if images:
            image, cmap = _display(inputs[i])
            ax.imshow(image, cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            for channel in inputs[i]:
                ax.plot(channel, color="black", linewidth=1)
            ax.tick_params(labelsize=6)
        ax.set_title(captions[i], fontsize=8)
    if n == 0:
        axes.flat[0].axis("off")
        axes.flat[0].text(0.5, 0.5, "no misclassified test examples", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
