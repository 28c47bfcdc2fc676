"""Reading run folders and drawing them: the learning-curve PNG every run writes at its end."""

from __future__ import annotations

import os
from pathlib import Path

from dlrun.errors import DlrunError
from dlrun.rundir import RunDir, find_runs, read_metrics, read_summary


def learning_curves(run_dir: RunDir) -> Path | None:
    """plots/learning_curves.png: loss and the second metric (accuracy or MAE) per epoch, train and val."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = sorted({k.split("/", 1)[1] for r in records for k in r if "/" in k}, key=lambda m: m != "loss")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for split in sorted({k.split("/", 1)[0] for r in records for k in r if k.endswith("/" + metric)}):
            points = [(r["epoch"], r[f"{split}/{metric}"]) for r in records if f"{split}/{metric}" in r]
            ax.plot(*zip(*points), marker="o", markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run_dir.path.name)
    fig.tight_layout()
    out = run_dir.plots / "learning_curves.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------ dlrun-report

COLUMNS = ("run", "overrides", "status", "monitor", "best", "test", "final_test", "params", "flops", "time_s")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, score) that no other point beats: no cheaper-or-equal point scores
    at least as well while one of the two is strictly better. Lower cost and higher score are better."""
    front = []
    for i, (cost, score) in enumerate(points):
        dominated = any(c <= cost and s >= score and (c < cost or s > score) for j, (c, s) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def rows_of(runs: list[Path]) -> list[dict]:
    summaries = [read_summary(run) for run in runs]
    common = set.intersection(*(set(s.get("overrides", [])) for s in summaries)) if summaries else set()
    base = Path(os.path.commonpath([r.resolve() for r in runs])) if len(runs) > 1 else runs[0].resolve().parent
    rows = []
    for run, s in zip(runs, summaries):
        best, monitor = s.get("best", {}), s.get("monitor", {}).get("metric", "")
        score = next((k for k in ("test/acc", "test/mae", "test/loss") if k in best), None)
        rows.append({
            "run": str(run.resolve().relative_to(base)) or run.name,
            "path": str(run),
            "overrides": " ".join(o for o in s.get("overrides", []) if o not in common),
            "status": s.get("status"),
            "monitor": monitor,
            "best": s.get("monitor_value"),
            "test": best.get(score) if score else None,  # of the best checkpoint
            "final_test": s.get("final", {}).get(score) if score else None,
            "test_metric": score,
            "params": s.get("model", {}).get("parameters", {}).get("total"),
            "flops": s.get("cost", {}).get("flops_per_sample"),
            "time_s": s.get("train", {}).get("seconds"),
        })
    return rows


def sort_rows(rows: list[dict], column: str, descending: bool) -> list[dict]:
    if column not in COLUMNS:
        raise SystemExit(f"dlrun-report: error: --sort {column}: allowed columns: {', '.join(COLUMNS)}")
    present = [r for r in rows if r[column] is not None]
    missing = [r for r in rows if r[column] is None]  # failed runs have no metrics: always last
    return sorted(present, key=lambda r: r[column], reverse=descending) + missing


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_table(rows: list[dict], path: Path) -> None:
    """CSV (by the .csv suffix) or Markdown (anything else)."""
    if path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "test_metric", "path"])
            writer.writeheader()
            writer.writerows(rows)
        return
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def plot_runs(rows: list[dict], runs: list[Path], out_dir: Path, cost: str) -> list[Path]:
    """learning_curves.png (train and val loss and score per epoch, a colour per run) and, for several runs,
    pareto.png (test score against `cost`, the Pareto front marked)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (row, run) in enumerate(zip(rows, runs)):
        records = read_metrics(RunDir(run))
        label = f"{row['run']}: {row['overrides']}" if row["overrides"] else row["run"]
        for ax, metric in zip(axes, ("loss", (row["test_metric"] or "test/acc").split("/")[1])):
            for split, style in (("val", "-"), ("train", "--")):  # one colour per run
                points = [(r["epoch"], r[f"{split}/{metric}"]) for r in records if f"{split}/{metric}" in r]
                if points:
                    ax.plot(*zip(*points), style, marker="o" if split == "val" else None, markersize=3,
                            color=colors[i % len(colors)], label=label if split == "val" else None)
            ax.set_ylabel(f"{metric} (val solid, train dashed)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    written.append(out_dir / "learning_curves.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    scored = [r for r in rows if r["test"] is not None and r[cost] is not None]
    if len(scored) >= 2:
        maximise = (scored[0]["test_metric"] or "").endswith("acc")
        points = [(float(r[cost]), r["test"] if maximise else -r["test"]) for r in scored]
        front = set(pareto_front(points))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([p[0] for p in points], [r["test"] for r in scored], color="tab:blue", label="runs")
        chosen = sorted((points[i][0], scored[i]["test"]) for i in front)
        ax.plot(*zip(*chosen), color="tab:red", marker="o", label="Pareto front")
        for r, (x, _) in zip(scored, points):  # the run's name, as in the table
            ax.annotate(r["run"], (x, r["test"]), xytext=(4, 4), textcoords="offset points", fontsize=8)
        ax.set_xlabel({"params": "parameters", "flops": "FLOPs per sample", "time_s": "training seconds"}[cost])
        ax.set_ylabel(scored[0]["test_metric"])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "pareto.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> None:
    try:
        report(argv)
    except DlrunError as err:
        raise SystemExit(f"dlrun-report: error: {err}") from None
    except BrokenPipeError:  # `dlrun-report ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


def report(argv: list[str] | None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="dlrun-report", description="A table and plots of dlrun runs and sweeps: accuracy next to what it costs."
    )
    parser.add_argument("folders", nargs="+", help="run folders, or sweep folders holding them")
    parser.add_argument("--sort", default="run", help=f"column to sort by: {', '.join(COLUMNS)}")
    parser.add_argument("--desc", action="store_true", help="sort in descending order")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown")
    parser.add_argument("--plots", type=Path, help="folder for the PNGs (default: <first folder>/plots)")
    parser.add_argument("--cost", default="params", choices=("params", "flops", "time_s"),
                        help="the cost axis of the Pareto plot")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        raise SystemExit(f"dlrun-report: error: no such folder: {', '.join(missing)}")
    runs = find_runs(args.folders)
    if not runs:
        raise SystemExit(f"dlrun-report: error: no run folders (with a summary) under {' '.join(args.folders)}")
    rows = sort_rows(rows_of(runs), args.sort, args.desc)
    runs = [Path(r["path"]) for r in rows]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} runs", header_style="bold")
    for column in COLUMNS:
        left = column in ("run", "overrides", "status", "monitor")
        table.add_column(column, justify="left" if left else "right", overflow="fold", no_wrap=not left)
    for r in rows:
        table.add_row(*(_cell(r[c]) for c in COLUMNS))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped or logged: room for the numbers
    console.print(table)
    for path in (args.csv, args.markdown):
        if path is not None:
            write_table(rows, path)
            print(f"wrote {path}")
    for path in plot_runs(rows, runs, args.plots or RunDir(Path(args.folders[0])).plots, args.cost):
        print(f"wrote {path}")
