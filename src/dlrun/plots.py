"""Every PNG dlrun draws, with matplotlib (the one plotting library). Inputs arrive as plain arrays, lists
or run folders, never tensors on a device; matplotlib is imported inside the functions, so the CLI path
stays light, and used through its object API (a Figure on an Agg canvas: no pyplot, whose registry of
open figures is global state and which costs another 30 ms to import); every PNG is written atomically
through the run folder's one write.

- a run's own pictures (`run_pictures`, with `logger.plots=true`): its learning curves (titled with its
  overrides, the best epoch marked), the confusion matrix of its best weights (square-root colour scale,
  counts up to 20 classes) or, for regression, their predictions against the targets;
- dlrun-report: the curves of several runs (the same function as a run's own) and the accuracy-versus-cost
  Pareto plot, readable from 1 to 50 runs: legends outside the data, labels that never overlap (a label
  that finds no free place is left out; the table names every run), tick labels on every axis whatever
  its span;
- dlrun-explain: attribution grids and misclassified examples (see tools/explain.py).
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dlrun.rundir import RunDir, read_metrics, write_bytes

DPI = 100


def figure(**kwargs: Any) -> Any:
    """A new matplotlib Figure (`Figure(**kwargs)`) drawn by Agg, nothing else holding it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def colormap(name: str, colours: int | None = None) -> Any:
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return cmap.resampled(colours) if colours else cmap


def save(fig: Any, path: Path) -> Path:
    """Render to PNG in memory, then write it atomically (its folder made if need be)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------ dlrun-explain


def _display(x: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A (C, H, W) input as imshow shows it: grey (H, W) for one channel, RGB (H, W, 3) in 0..1
    for three (scaled by its own range), the channels' mean otherwise."""
    if x.shape[0] == 3:
        rgb = np.moveaxis(x, 0, -1)
        span = rgb.max() - rgb.min()
        return (rgb - rgb.min()) / (span if span > 0 else 1.0), None
    return x.mean(axis=0), "gray"


def _grid(n: int, per_row: int, cell: tuple[float, float]) -> tuple[Any, np.ndarray]:
    rows = max(1, math.ceil(n / per_row))
    fig = figure(figsize=(cell[0] * per_row, cell[1] * rows), layout="constrained")
    axes = fig.subplots(rows, per_row, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def _overlay(heat: np.ndarray, signed: bool) -> tuple[np.ndarray, Any]:
    """An (H, W, 4) RGBA layer and its colour scale: signed, red for positive and blue for negative attribution
    (bwr, symmetric around 0); unsigned (saliency), darker red for larger values. As opaque as the value is
    large (zero is transparent, so the input shows through)."""
    from matplotlib.colors import Normalize

    bound = float(np.abs(heat).max()) or 1.0
    norm = Normalize(-bound, bound) if signed else Normalize(0.0, bound)
    cmap = colormap("bwr" if signed else "Reds")
    rgba = cmap(norm(heat))
    rgba[..., 3] = 0.9 * np.abs(heat) / bound
    return rgba, (norm, cmap)


def attribution_images(inputs: np.ndarray, maps: np.ndarray, captions: Sequence[tuple[str, str]], title: str,
                       signed: bool = True):
    """For each example two panels: the input (captioned with its true label) and the attribution map summed
    over channels over the input in grey (captioned with the class attributed), with its colour bar: signed,
    red pushes towards that class and blue away from it; unsigned (saliency), red marks what matters most.
    Four examples per row. Returns the figure."""
    from matplotlib.cm import ScalarMappable

    n = len(inputs)
    pairs = min(4, max(n, 1))
    fig, axes = _grid(2 * n, 2 * pairs, (2.1, 2.6))
    for i in range(n):
        image, cmap = _display(inputs[i])
        left, right = axes.flat[2 * i], axes.flat[2 * i + 1]
        left.imshow(image, cmap=cmap)
        right.imshow(inputs[i].mean(axis=0), cmap="gray")
        layer, (norm, scale) = _overlay(maps[i].sum(axis=0), signed)
        right.imshow(layer)
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=scale), ax=right, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=6)
        for ax, caption in zip((left, right), captions[i]):
            ax.set_title(caption, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


def attribution_signals(inputs: np.ndarray, maps: np.ndarray, captions: Sequence[tuple[str, str]], title: str,
                        signed: bool = True):
    """For each example the signal (C, L: a line per channel) over a band coloured by the attribution
    per step (summed over channels), with its colour bar: signed, red pushes towards the target and blue
    away from it; unsigned (saliency), red marks what matters most. Two per row. Returns the figure."""
    n = len(inputs)
    per_row = 2 if n > 1 else 1
    fig, axes = _grid(n, per_row, (5.2, 2.4))
    for i in range(n):
        ax, signal, steps = axes.flat[i], inputs[i], maps[i].sum(axis=0)
        bound = float(np.abs(steps).max()) or 1.0
        low, high = float(signal.min()), float(signal.max())
        pad = 0.1 * (high - low or 1.0)
        band = ax.imshow(steps[None, :], aspect="auto", cmap="bwr" if signed else "Reds",
                         vmin=-bound if signed else 0.0, vmax=bound, alpha=0.55,
                         extent=(-0.5, signal.shape[1] - 0.5, low - pad, high + pad), interpolation="nearest")
        for channel in signal:
            ax.plot(np.arange(signal.shape[1]), channel, color="black", linewidth=1.2)
        ax.set_xlim(-0.5, signal.shape[1] - 0.5)
        ax.set_title("   ".join(captions[i]), fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(band, ax=ax, pad=0.01, fraction=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    return fig


def examples(path: Path, inputs: np.ndarray, captions: Sequence[str], title: str) -> Path:
    """A grid of inputs (images, or signals drawn as lines), each with its caption; six per row."""
    n = len(inputs)
    images = inputs.ndim == 4
    per_row = min(6, max(n, 1))
    fig, axes = _grid(max(n, 1), per_row, (2.0, 2.2) if images else (3.0, 1.9))
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
    return save(fig, path)


# ------------------------------------------------------------ learning curves and comparisons

# Beyond this many entries a legend names the best runs only; the others are drawn thin and grey.
LEGEND_ENTRIES = 10


def human(value: float, _pos: Any = None) -> str:
    """53098 -> '53.1k', 1.2e6 -> '1.2M', 0.5 -> '0.5': short tick labels for a cost axis."""
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def log_axis(axis, low: float, high: float) -> None:
    """A log-scale axis with labelled ticks even when the values span less than a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(high / low) if low > 0 and high > low else 0.0
    subs = (1.0,) if decades >= 3 else (1.0, 2.0, 5.0) if decades >= 1.2 else (1.0, 2.0, 3.0, 5.0, 7.0)
    if decades < 0.5:
        subs = tuple(float(s) for s in range(1, 10))
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(human))
    axis.set_minor_formatter(NullFormatter())


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], priority: list[int]) -> list[Any]:
    """Annotate points, most important first (`priority`: indices), each at the first of a few offsets
    where it overlaps neither another label nor the axes' edge; a label with no free place is left out."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed, texts = [], []
    for i in priority:
        for dx, dy, ha, va in ((5, 5, "left", "bottom"), (5, -5, "left", "top"), (-5, 5, "right", "bottom"),
                               (-5, -5, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top")):
            text = ax.annotate(labels[i], points[i], xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=8)
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                texts.append(text)
                break
            text.remove()
    return texts


def _label(row: dict[str, Any]) -> str:
    """A row's name in a legend: its run and its overrides, wrapped (never cut: the override that tells two
    runs apart is often the last one), at most four lines."""
    runs = row.get("runs") or [row["run"]]
    shown = ", ".join(runs if len(runs) <= 3 else [*runs[:2], "...", runs[-1]])
    name = runs[0] if len(runs) == 1 else f"{len(runs)} seeds (runs {shown})"
    lines = textwrap.wrap(f"{name}: {row['overrides']}" if row["overrides"] else name, 44, break_long_words=False)
    return "\n".join(lines[:3] + ([" ".join(lines[3:])] if len(lines) > 3 else []))


# validation and training curves: line style and marker face (hollow for training, so one-epoch points differ too)
SPLIT_STYLES = (("val", "-", None), ("train", "--", "none"))


def learning_curves(rows: list[dict[str, Any]], score_metric: str, title: str | None = None,
                    best_epoch: int | None = None):
    """Loss and score per epoch, validation solid and training dashed, with a marker on every epoch (a
    1-epoch run shows as points), one colour per row (a configuration: `records` holds the epoch records
    of each of its runs, which share the colour); the legend beside the plots names at most
    LEGEND_ENTRIES rows (rows come best first when there are more; the rest are grey). A run's own
    curves give `best_epoch` (a dotted line) and `title`. Returns the figure."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    named = rows[:LEGEND_ENTRIES]
    # the named rows' colours: no greys among them (grey is for the rows the legend does not name)
    colors = [c for c in colormap("tab10" if len(named) <= 9 else "tab20").colors if len(set(c)) > 1]
    fig = figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, row in enumerate(rows):
        color, width = (colors[i % len(colors)], 1.5) if i < len(named) else ("0.7", 0.8)
        for records in row["records"]:
            for ax, metric in zip(axes, ("loss", score_metric)):
                for split, style, face in SPLIT_STYLES:
                    points = [(r["epoch"], r[f"{split}/{metric}"]) for r in records
                              if math.isfinite(r.get(f"{split}/{metric}", math.nan))]  # a diverged epoch is left out
                    if points:
                        ax.plot(*zip(*points), style, marker="o", markersize=3.5, color=color, linewidth=width,
                                markerfacecolor=face or color)
    epochs = {r["epoch"] for row in rows for records in row["records"] for r in records}
    for ax, metric in zip(axes, ("loss", score_metric)):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.5", linestyle=":", linewidth=1.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (val solid, train dashed and hollow)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # one epoch: its tick alone, not a fractional axis around it
            ax.set_xlim(min(epochs) - 0.5, min(epochs) + 0.5)
            ax.set_xticks(sorted(epochs))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[i % len(colors)], marker="o", markersize=3.5, label=_label(row))
               for i, row in enumerate(named)]
    if len(rows) == 1:  # one configuration: its name is the title; the legend tells the lines apart
        title = title or (_label(rows[0]) if rows[0].get("n", 1) > 1 else f"run {_label(rows[0])}")
        handles = [Line2D([], [], color=colors[0], marker="o", markersize=3.5, linestyle=style, label=split,
                          markerfacecolor=face or colors[0]) for split, style, face in SPLIT_STYLES]
    if len(rows) > len(named):
        handles.append(Line2D([], [], color="0.7", label=f"{len(rows) - len(named)} more (grey)"))
    if best_epoch is not None:
        handles.append(Line2D([], [], color="0.5", linestyle=":", label=f"best epoch ({best_epoch})"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    if title:
        fig.suptitle(textwrap.fill(title, 150), fontsize=10)
    return fig


ANNOTATE_UP_TO = 20  # classes: beyond this the confusion matrix shows colours only


def confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], title: str):
    """Rows (true classes) normalised to sum 1 and coloured by that share (square-root scale, with its
    colour bar, so confusions of a few percent still show among 100 classes); the counts written in the
    cells up to ANNOTATE_UP_TO classes; class names on both axes. Returns the figure."""
    from matplotlib.colors import PowerNorm

    counts = np.asarray(matrix, dtype=np.int64).reshape(len(names), len(names))
    k = len(names)
    support = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    side = min(12.0, max(4.5, 0.32 * k + 2.5))
    fig = figure(figsize=(side + 1.4, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    font = 9 if k <= 10 else 7
    ax.set_xticks(range(k), names, rotation=90, fontsize=font)
    ax.set_yticks(range(k), names, fontsize=font)
    if k <= ANNOTATE_UP_TO:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=font,
                        color="white" if shares[i, j] > 0.4 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the true class")
    ax.set_title(textwrap.fill(title, 80), fontsize=10)
    return fig


def predicted_vs_true(true: np.ndarray, predicted: np.ndarray, title: str):
    """Each (sample, output) as a point, predicted against true, a colour per output (named in the
    legend beside the plot, up to 10 outputs); the diagonal is a perfect prediction. Returns the figure."""
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    true, predicted = true.reshape(len(true), -1), predicted.reshape(len(predicted), -1)
    finite = np.isfinite(true) & np.isfinite(predicted)
    fig = figure(figsize=(7.8, 6), layout="constrained")
    ax = fig.subplots()
    for j in range(true.shape[1]):
        ax.scatter(true[finite[:, j], j], predicted[finite[:, j], j], s=6, alpha=0.6,
                   label=f"output {j}" if true.shape[1] <= 10 else None)
    if finite.any():
        low, high = float(min(true[finite].min(), predicted[finite].min())), float(max(true[finite].max(),
                                                                                        predicted[finite].max()))
        ax.plot([low, high], [low, high], color="black", linewidth=1.0, label="predicted = true")
        fig.legend(fontsize="small", loc="outside right upper")  # beside the points, never over them
    ax.set_xlabel("true value")
    ax.set_ylabel("predicted value")
    ax.grid(alpha=0.3)
    ax.set_title(textwrap.fill(title, 80), fontsize=10)
    return fig


def run_pictures(folder: RunDir, summary: dict[str, Any], predictions: tuple[np.ndarray, np.ndarray] | None) -> list[Path]:
    """A run's own pictures: its learning curves (if it has metrics), titled with the folder's name and the
    run's overrides, the best epoch marked; the confusion matrix of its best weights on the test split
    (classification, from the summary) or their `predictions` (true, predicted) against the targets."""
    best = summary.get("best", {}).get("epoch")
    overrides = " ".join(summary.get("overrides", [])) or "defaults"
    written = []
    records = read_metrics(folder)
    if records:
        score = "mae" if summary.get("data", {}).get("task") == "regression" else "acc"
        rows = [{"run": folder.path.name, "overrides": overrides, "records": [records]}]
        written.append(save(learning_curves(rows, score, f"{folder.path.name}: {overrides}", best),
                            folder.learning_curves))
    title = f"{folder.path.name}: best weights (epoch {best}), test split"
    if summary.get("classes"):
        classes = summary["classes"]
        written.append(save(confusion_matrix(classes["best"]["confusion_matrix"], classes["names"], title),
                            folder.confusion_matrix))
    elif predictions is not None:
        written.append(save(predicted_vs_true(*predictions, title), folder.predicted_vs_true))
    return written


def lr_find_curve(found: dict[str, Any], title: str):
    """trainer.lr_find's range test: the smoothed training loss against the lr (log axis), the suggestion marked."""
    fig = figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(found["lrs"], found["losses"], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    if found["suggestion"] is not None:
        at = found["lrs"].index(found["suggestion"])
        ax.plot([found["suggestion"]], [found["losses"][at]], "o", color="tab:red",
                label=f"suggestion: {found['suggestion']:.3g} (steepest descent)")
        ax.legend(loc="best")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def pareto_plot(rows: list[dict[str, Any]], cost: str, cost_label: str, score_metric: str, maximise: bool,
                front: list[int]):
    """Test score against `cost`, one point per row (error bars: the std over seeds where a row has
    several), the Pareto front marked; returns the figure (the caller saves it)."""
    fig = figure(figsize=(8, 5))
    ax = fig.subplots()
    xs, ys = [float(r[cost]) for r in rows], [r["test"] for r in rows]
    runs = [i for i, r in enumerate(rows) if not r.get("variant")]
    errors = [rows[i].get("test_std") or 0.0 for i in runs]
    ax.errorbar([xs[i] for i in runs], [ys[i] for i in runs], yerr=errors if any(errors) else None, fmt="o",
                color="tab:blue", ecolor="tab:blue", capsize=3, label="runs (± std over seeds)" if any(errors) else "runs")
    variants = [i for i, r in enumerate(rows) if r.get("variant")]
    if variants:
        ax.scatter([xs[i] for i in variants], [ys[i] for i in variants], marker="^", color="tab:green",
                   label="variants (dlrun-compress)")
    chosen = sorted((xs[i], ys[i]) for i in front)
    ax.plot(*zip(*chosen), color="tab:red", marker="o", markersize=10, markerfacecolor="none", zorder=3,
            label="Pareto front")
    ax.set_xscale("log")
    low, high = min(xs), max(xs)
    pad = (high / low) ** 0.08 if high > low else 1.5
    ax.set_xlim(low / pad, high * pad)
    log_axis(ax.xaxis, low / pad, high * pad)
    ax.set_xlabel(cost_label)
    ax.set_ylabel(f"{score_metric} ({'higher' if maximise else 'lower'} is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncols=3, fontsize="small", borderaxespad=0)  # above
    fig.tight_layout()
    rest = sorted(set(range(len(rows))) - set(front), key=lambda i: -ys[i] if maximise else ys[i])
    # few points: named by their overrides (as in the table); many: by the table's run column
    labels = [r["overrides"] if len(rows) <= 8 and 0 < len(r["overrides"]) <= 40 else r["run"] for r in rows]
    # points on the same spot (bf16 and fp16 score and cost as the original) share one label naming them all
    spots: dict[tuple[float, float], list[int]] = {}
    for i in [*front, *rest]:
        spots.setdefault((xs[i], ys[i]), []).append(i)
    place_labels(ax, list(spots), [textwrap.fill(", ".join(labels[i] for i in same), 40, break_on_hyphens=False)
                                  for same in spots.values()],
                 list(range(len(spots))))
    return fig
