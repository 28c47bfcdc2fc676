"""`dlrun-report <run or sweep folders>`: a table of runs, accuracy next to what it costs, with its
CSV/Markdown exports and plots. Runs that differ only in `trainer.seed` or in `dataset.fold` (k-fold
cross-validation) are one configuration: its row gives the mean, the standard deviation and n of every figure.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

from dlrun.errors import DlrunError
from dlrun.rundir import LEARNING_CURVES, PARETO, RunDir, check_links, find_runs, read_metrics, read_summary
from dlrun.sinks import full_batch


COLUMNS = ("run", "overrides", "n", "status", "monitor", "best", "test", "final_test", "macro_f1", "vs_linear",
           "params", "flops", "latency_ms", "time_s")
# The figures that are averaged over a configuration's seeds (mean, std); the others are the same for all.
AVERAGED = ("best", "test", "final_test", "macro_f1", "vs_linear", "latency_ms", "time_s")
COST_LABELS = {"params": "parameters", "flops": "FLOPs per sample", "time_s": "training seconds",
               "latency_ms": "latency at a full batch, ms (median)"}


def full_batch_ms(latency_ms: dict[str, float] | None) -> float | None:
    """The full-batch figure of a `latency_ms` entry, if there is one."""
    key = full_batch(latency_ms or {})
    return latency_ms[key] if key else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, score) that no other point beats: no cheaper-or-equal point scores
    at least as well while one of the two is strictly better. Lower cost and higher score are better."""
    front = []
    for i, (cost, score) in enumerate(points):
        dominated = any(c <= cost and s >= score and (c < cost or s > score) for j, (c, s) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


FLOAT = re.compile(r"(?<=[=,(\[ ])(-?\d+\.\d{5,}(?:e-?\d+)?)(?=$|[,)\] ])")


def shortened(overrides: str) -> str:
    """Overrides as a reader wants them in a table or a picture: floats at 4 significant digits (an Optuna
    trial's `optimizer.lr=0.0012520653814999472` reads `optimizer.lr=0.001252`). Runs are grouped, and the
    CSV written, with the overrides as they were given."""
    return " ".join(FLOAT.sub(lambda m: f"{float(m.group(1)):.4g}", o) for o in overrides.split())


def displayed(rows: list[dict]) -> list[dict]:
    return [{**r, "overrides": shortened(r["overrides"])} for r in rows]


def is_seed(override: str) -> bool:
    """An override that repeats a configuration (another seed, another fold), which merged rows average over."""
    return override.lstrip("+~").split("=", 1)[0] in ("trainer.seed", "dataset.fold")


def rows_of(runs: list[Path]) -> list[dict]:
    """One row per run; `overrides` without those common to every run."""
    summaries = [read_summary(run) for run in runs]
    try:
        return rows_of_summaries(runs, summaries)
    except (AttributeError, TypeError, KeyError) as err:  # a field of another shape than dlrun writes
        bad = next((run for run, s in zip(runs, summaries) if not well_formed(s)), runs[0])
        raise DlrunError(f"{RunDir(bad).summary} is not a summary dlrun wrote ({type(err).__name__}: {err})") from None


def well_formed(summary: dict) -> bool:
    """Whether the sections a report reads have the shapes dlrun writes."""
    sections = ("best", "final", "monitor", "model", "cost", "train", "baselines")
    return (all(isinstance(summary.get(k, {}), dict) for k in sections)
            and isinstance(summary.get("overrides", []), list))


def rows_of_summaries(runs: list[Path], summaries: list[dict]) -> list[dict]:
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
            "macro_f1": best.get("test/macro_f1"),  # classification: of the best checkpoint
            # regression: the best checkpoint's test MAE as a multiple of the linear baseline's (< 1 beats it)
            "vs_linear": s.get("baselines", {}).get("linear", {}).get("model_mae_ratio", {}).get("best"),
            "params": s.get("model", {}).get("parameters", {}).get("total"),
            "flops": s.get("cost", {}).get("flops_per_sample"),
            "time_s": s.get("train", {}).get("seconds"),
            "latency_ms": full_batch_ms(s.get("cost", {}).get("latency_ms")),
            "threads": s.get("cost", {}).get("latency", {}).get("threads"),  # what the latency was measured on
        })
    return rows


def variant_rows(rows: list[dict]) -> list[dict]:
    """The cheaper variants `dlrun-compress` made of these runs (their compress.json), as rows of the
    Pareto plot: named `<run>/<variant>`, with their own score, parameters, FLOPs and latency. The
    original is the run's own point and is left out."""
    found = []
    for row in rows:
        path = RunDir(Path(row["paths"][0])).compress_report
        try:
            report = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as err:
            raise DlrunError(f"{path}: cannot be read ({err}); rerun dlrun-compress or remove it") from None
        metric = report.get("metric")
        for v in report.get("variants", []):
            if v.get("name") == "original" or metric not in v or metric != row["test_metric"]:
                continue
            name = v["name"] if len(rows) == 1 else f"{row['run']}/{v['name']}"
            found.append({**{c: None for c in COLUMNS}, "run": name, "overrides": "",
                          "test": v[metric], "test_metric": metric, "params": v.get("parameters"),
                          "flops": v.get("flops_per_sample"), "latency_ms": full_batch_ms(v.get("latency_ms")),
                          "threads": report.get("threads"), "variant": True})
    return found


def by_configuration(rows: list[dict], merge_seeds: bool = True) -> list[dict]:
    """One row per configuration: runs whose overrides differ only in `trainer.seed` or `dataset.fold` are merged
    (each run is its own row if not `merge_seeds`). A row has n, the mean of each AVERAGED figure over the runs that
    have it and its sample standard deviation (`<figure>_std`, None for one value), and the runs' names and
    paths (`runs`, `paths`)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if merge_seeds:
            row = {**row, "overrides": " ".join(o for o in row["overrides"].split() if not is_seed(o))}
        groups.setdefault(row["overrides"] if merge_seeds else row["path"], []).append(row)
    merged = []
    for members in groups.values():
        first = members[0]
        row = {**first, "n": len(members), "runs": [m["run"] for m in members], "paths": [m["path"] for m in members],
               "status": ", ".join(sorted({m["status"] or "-" for m in members}))}
        if len(members) > 1:
            row["run"] = f"{first['run']} (+{len(members) - 1})"
        for column in AVERAGED:
            values = [m[column] for m in members if m[column] is not None]
            row[column] = statistics.fmean(values) if values else None
            row[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else None
        merged.append(row)
    return merged


def sort_rows(rows: list[dict], column: str, descending: bool) -> list[dict]:
    if column not in COLUMNS:
        raise SystemExit(f"dlrun-report: error: --sort {column}: allowed columns: {', '.join(COLUMNS)}")
    present = [r for r in rows if r[column] is not None]
    missing = [r for r in rows if r[column] is None]  # failed runs have no metrics: always last
    return sorted(present, key=lambda r: natural(r[column]), reverse=descending) + missing


def natural(value):
    """Sort key: numbers inside strings compare as numbers ("9" before "10", as run folders are numbered)."""
    if not isinstance(value, str):
        return value
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", value) if part]


def _cell(value, std=None) -> str:
    if value is None:
        return "-"
    if std is not None:
        return f"{_cell(value)} ± {_cell(std)}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# The text columns of the console table and the width each keeps however many figures stand beside it.
TEXT_WIDTHS = {"run": 10, "overrides": 24, "status": 9, "monitor": 8}


def shown(rows: list[dict]) -> list[str]:
    """The columns worth printing: those some row has a value in (macro F1 is for classification,
    vs_linear for regression)."""
    return [c for c in COLUMNS if c in ("run", "overrides") or any(r[c] is not None for r in rows)]


def cells(row: dict, columns: list[str]) -> list[str]:
    return [_cell(shortened(row[c]) if c == "overrides" else row[c], row.get(f"{c}_std")) for c in columns]


def write_table(rows: list[dict], path: Path) -> None:
    """CSV (by the .csv suffix; means and standard deviations in columns of their own) or Markdown
    (anything else; `mean ± std` where a configuration has several seeds)."""
    if path.suffix == ".csv":
        import csv
        import io

        fields = [*COLUMNS, *(f"{c}_std" for c in AVERAGED), "test_metric", "paths"]
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "paths": " ".join(r["paths"])} for r in rows)
        content = buffer.getvalue()
    else:
        columns = shown(rows)
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cells(r, columns)) + " |" for r in rows]
        content = "\n".join(lines) + "\n"
    try:
        with open(path, "w", newline="") as f:
            f.write(content)
    except OSError as err:
        raise DlrunError(f"{path}: cannot be written ({err.strerror or err})") from None


def plot_runs(rows: list[dict], out_dir: Path, cost: str) -> list[Path]:
    """learning_curves.png (a colour per configuration) and, for several configurations with a test
    score, pareto.png (test score against `cost`, the Pareto front marked, seeds as error bars)."""
    from dlrun.plots import learning_curves, pareto_plot, save

    rows = displayed(rows)
    score = next((r["test_metric"] for r in rows if r["test_metric"]), "test/acc")
    maximise = score.endswith("acc")
    ranked = sorted(rows, key=lambda r: (r["test"] is None, -(r["test"] or 0) if maximise else (r["test"] or 0)))
    curves = [{**r, "records": [read_metrics(RunDir(Path(p))) for p in r["paths"]]} for r in ranked]
    written = [save(learning_curves(curves, score.split("/")[1]), out_dir / LEARNING_CURVES)]
    scored = [r for r in rows + variant_rows(rows) if r["test"] is not None and r.get(cost) is not None]
    if cost == "latency_ms":  # latencies on other thread counts do not compare: the runs' count decides
        threads = next((r["threads"] for r in scored if not r.get("variant")), None)
        apart = [r for r in scored if r["threads"] != threads]
        scored = [r for r in scored if r["threads"] == threads]
        if apart:
            print(f"{PARETO} leaves out {len(apart)} variant(s) timed on {apart[0]['threads']} thread(s): the runs' "
                  f"latencies were timed on {threads} (dlrun-compress --threads {threads} makes them comparable)")
    if len(scored) >= 2:
        front = pareto_front([(float(r[cost]), r["test"] if maximise else -r["test"]) for r in scored])
        written.append(save(pareto_plot(scored, cost, COST_LABELS[cost], score, maximise, front), out_dir / PARETO))
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
    parser.add_argument("--per-run", action="store_true",
                        help="one row per run (default: runs that differ only in trainer.seed or dataset.fold are one row, "
                             "mean ± std)")
    parser.add_argument("--cost", default="params", choices=tuple(COST_LABELS),
                        help="the cost axis of the Pareto plot (variants made by dlrun-compress are points too)")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        raise SystemExit(f"dlrun-report: error: no such folder: {', '.join(missing)}")
    if args.plots is None:  # the PNGs go into the first folder's plots/
        check_links(RunDir(Path(args.folders[0])))
    runs = find_runs(args.folders)
    if not runs:
        raise SystemExit(f"dlrun-report: error: no run folders (with a summary) under {' '.join(args.folders)}")
    rows = sort_rows(by_configuration(rows_of(runs), merge_seeds=not args.per_run), args.sort, args.desc)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(runs)} runs" + (f", {len(rows)} configurations" if len(rows) < len(runs) else ""),
                  header_style="bold")
    columns = shown(rows)
    for column in columns:
        left = column in TEXT_WIDTHS
        table.add_column(column, justify="left" if left else "right", overflow="fold", no_wrap=not left,
                         min_width=TEXT_WIDTHS.get(column))
    for r in rows:  # a mean ± std on two lines: the figures take half the width, the text columns keep theirs
        table.add_row(*(cell.replace(" ± ", "\n± ") for cell in cells(r, columns)))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))  # piped or logged: COLUMNS if set, and room for the numbers
    console.print(table)
    for path in (args.csv, args.markdown):
        if path is not None:
            write_table(rows, path)
            print(f"wrote {path}")
    for path in plot_runs(rows, args.plots or RunDir(Path(args.folders[0])).plots, args.cost):
        print(f"wrote {path}")
