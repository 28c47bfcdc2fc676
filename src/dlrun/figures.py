"""The PNGs dlrun draws: a run's learning curves, and for several runs their curves and the
accuracy-versus-cost Pareto plot. Readable from 1 to 50 runs: legends outside the data, labels
that never overlap (a label that finds no free place is left out; the table names every run),
tick labels on every axis, whatever the span of its values.

matplotlib (Agg, files only) is imported inside the functions: the CLI path stays light.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dlrun.rundir import RunDir, read_metrics

# Beyond this many entries a legend names the best runs only; the others are drawn thin and grey.
LEGEND_ENTRIES = 10


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def learning_curves(run_dir: RunDir) -> Path | None:
    """plots/learning_curves.png (see `run_curves`), if the run has metrics."""
    records = read_metrics(run_dir)
    return save(run_curves(run_dir, records), run_dir.plots / "learning_curves.png") if records else None


def run_curves(run_dir: RunDir, records: list[dict[str, Any]]):
    """Loss and the second metric (accuracy or MAE) per epoch, train and val, titled with the run's
    overrides, the best epoch marked."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    summary = run_dir.read_summary() if run_dir.summary.exists() else {}
    best = summary.get("best", {}).get("epoch")
    metrics = sorted({k.split("/", 1)[1] for r in records for k in r if "/" in k}, key=lambda m: m != "loss")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for split in sorted({k.split("/", 1)[0] for r in records for k in r if k.endswith("/" + metric)}):
            points = [(r["epoch"], r[f"{split}/{metric}"]) for r in records if f"{split}/{metric}" in r]
            ax.plot(*zip(*points), marker="o", markersize=3, label=split)
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label=f"best epoch ({best})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    overrides = " ".join(summary.get("overrides", [])) or "defaults"
    fig.suptitle(f"{run_dir.path.name}: {overrides}", fontsize=10, wrap=True)
    fig.tight_layout()
    return fig


def _label(row: dict[str, Any]) -> str:
    label = f"{row['run']}: {row['overrides']}" if row["overrides"] else row["run"]
    return label if len(label) <= 60 else label[:57] + "..."


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def sweep_curves(rows: list[dict[str, Any]], score_metric: str):
    """Validation (solid) and training (dashed) loss and score per epoch, one colour per row (a
    configuration: its seeds share the colour); the legend beside the plots, naming at most
    LEGEND_ENTRIES rows (rows come best first when there are more; the rest are grey). Returns the figure."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    named = rows[:LEGEND_ENTRIES]
    colors = plt.get_cmap("tab10" if len(named) <= 10 else "tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for i, row in enumerate(rows):
        color, width = (colors[i % len(colors)], 1.5) if i < len(named) else ("0.7", 0.8)
        for path in row["paths"]:
            records = read_metrics(RunDir(Path(path)))
            for ax, metric in zip(axes, ("loss", score_metric)):
                for split, style in (("val", "-"), ("train", "--")):
                    points = [(r["epoch"], r[f"{split}/{metric}"]) for r in records if f"{split}/{metric}" in r]
                    if points:
                        ax.plot(*zip(*points), style, color=color, linewidth=width)
    for ax, metric in zip(axes, ("loss", score_metric)):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (val solid, train dashed)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], label=_label(row)) for i, row in enumerate(named)]
    if len(rows) > len(named):
        handles.append(plt.Line2D([], [], color="0.7", label=f"{len(rows) - len(named)} more (grey)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def pareto_plot(rows: list[dict[str, Any]], cost: str, cost_label: str, score_metric: str, maximise: bool,
                front: list[int]):
    """Test score against `cost`, one point per row (error bars: the std over seeds where a row has
    several), the Pareto front marked; returns the figure (the caller saves it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
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
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    rest = sorted(set(range(len(rows))) - set(front), key=lambda i: -ys[i] if maximise else ys[i])
    # few points: named by their overrides (as in the table); many: by the table's run column
    labels = [r["overrides"] if len(rows) <= 8 and 0 < len(r["overrides"]) <= 40 else r["run"] for r in rows]
    place_labels(ax, list(zip(xs, ys)), labels, [*front, *rest])
    return fig
