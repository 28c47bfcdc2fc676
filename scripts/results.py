"""`make results`: run every preset the README quotes and regenerate the README's results tables.

Each row is a real `dlrun` run per seed (trainer.seed=0, 1, 2) on this machine with one thread
(`device.threads=1`, OMP_NUM_THREADS=1), read back from its summary.json: the test score as mean ± std over
the seeds, the wall time of seed 0's command. The figures go to results/results.json (with the machine, the
date, the versions and the command) and into README.md between the `<!-- generated:... -->` markers; nothing
in those tables is typed by hand. A row rerun alone (--only) keeps the machine and date it was made on, which the
table names under a mark. A run is bit-exact only on the machine that made it; elsewhere its score
lands within the seeds' spread (tests/test_results.py reruns a row); times depend on the machine and its
load, which the table states.

    python scripts/results.py                 # everything (about 15 minutes on a 2-core CPU)
    python scripts/results.py --only mnist1d_logreg mnist1d_cnn   # some rows; the others are kept
    python scripts/results.py --check          # is the README what results.json says? (no runs)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "results.json"
README = ROOT / "README.md"
DLRUN = str(Path(sys.executable).with_name("dlrun"))

# table -> rows: (row name, dlrun overrides, the paper's or reference figure, or None)
TABLES: dict[str, list[tuple[str, list[str], str | None]]] = {
    "mnist1d": [
        ("mnist1d_logreg", ["experiment=mnist1d_logreg"], "32%"),
        ("mnist1d_mlp", ["experiment=mnist1d_mlp"], "68%"),
        ("mnist1d_cnn", ["experiment=mnist1d_cnn"], "94%"),
        ("mnist1d_gru", ["experiment=mnist1d_gru"], "91%"),
        ("mnist1d_gru_swa", ["experiment=mnist1d_gru_swa"], "91%"),
        ("mnist1d_cnn + shifts", ["experiment=mnist1d_cnn", "dataset.crop_padding=2"], None),
        ("mnist1d_cnn_tuned", ["experiment=mnist1d_cnn_tuned"], None),
        ("mnist1d_cnn_swa", ["experiment=mnist1d_cnn_swa"], "94%"),
        ("resnet", ["model=resnet", "dataset=mnist1d"], None),
        ("transformer", ["model=transformer", "model.patch_size=4", "dataset=mnist1d"], None),
        ("mnist1d_transformer", ["experiment=mnist1d_transformer"], None),
    ],
    "sequence": [
        ("dataset=sequence (LSTM)", ["dataset=sequence"], None),
        ("sequence_rnn", ["experiment=sequence_rnn"], None),
        ("sequence_lstm", ["experiment=sequence_lstm"], None),
        ("sequence_lstm (GRU)", ["experiment=sequence_lstm", "model.cell=gru"], None),
    ],
    "presets": [
        ("default", [], None),
        ("digits_cnn", ["experiment=digits_cnn"], None),
    ],
}
# Presets whose data must be downloaded (not possible on the machine that made the tables):
# their parameter count only, from the model built for the dataset's input shape.
NEEDS_DOWNLOAD: dict[str, tuple[list[str], tuple[int, ...], int]] = {
    "mnist_cnn": (["experiment=mnist_cnn"], (1, 28, 28), 10),
    "mnist_keras_cnn": (["experiment=mnist_keras_cnn"], (1, 28, 28), 10),
    "cifar10_cnn": (["experiment=cifar10_cnn"], (3, 32, 32), 10),
}


SEEDS = (0, 1, 2)


def run_seeds(overrides: list[str], workdir: Path) -> dict:
    """A row: `run_row` for each seed, one after the other."""
    return seeds_row(overrides, [run_row(seed_overrides(overrides, seed), workdir) for seed in SEEDS])


def seed_overrides(overrides: list[str], seed: int) -> list[str]:
    return [*overrides, f"trainer.seed={seed}"]


def seeds_row(overrides: list[str], runs: list[dict]) -> dict:
    """The row of a command's runs over SEEDS: the test score as mean and (sample) std over them, the rest of seed
    0's."""
    import statistics

    tests = [r["test"] for r in runs]
    return {**runs[0], "overrides": overrides, "seeds": list(SEEDS), "tests": tests, "test": statistics.fmean(tests),
            "test_std": statistics.stdev(tests), "best_epochs": [r["best_epoch"] for r in runs]}


def run_row(overrides: list[str], workdir: Path) -> dict:
    """One `dlrun` run with one thread; the figures of its summary."""
    folder = Path(tempfile.mkdtemp(prefix="run", dir=workdir))  # new and empty, also with runs side by side
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run([DLRUN, *overrides, "device=cpu", "device.threads=1", f"hydra.run.dir={folder}"],
                          cwd=workdir, env=env, capture_output=True, text=True)
    command_s = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"results: dlrun {' '.join(overrides)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    best = summary["best"]
    metric = "test/acc" if "test/acc" in best else "test/mae"
    # a preset that averages its weights (trainer.swa_start) is scored with them: they are its recipe's model
    scored = summary["swa"] if summary.get("swa", {}).get("averaged_epochs") else best
    row = {"overrides": overrides, "metric": metric, "test": scored[metric], "best_epoch": best["epoch"],
           "weights": "swa" if scored is not best else "best",
           "epochs": summary["epochs"], "parameters": summary["model"]["parameters"]["total"],
           "flops_per_sample": summary["cost"]["flops_per_sample"], "train_s": summary["train"]["seconds"],
           "wall_s": command_s, "run_s": summary["wall_time_s"]}
    if "baselines" in summary:
        row["baselines"] = {name: b["mae"] for name, b in summary["baselines"].items()}
    return row


def parameters_only(overrides: list[str], input_shape: tuple[int, ...], classes: int) -> dict:
    """The parameter count of a preset's model, built for the input shape without its data."""
    from hydra import compose, initialize_config_dir

    from dlrun.config.schema import register_configs
    from dlrun.cost import count_parameters
    from dlrun.models import build_model

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    model = build_model(cfg.model, input_shape, classes)
    return {"overrides": overrides, "parameters": count_parameters(model)["total"], "not_run": "needs a download"}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_at_start": round(os.getloadavg()[0], 2),
            "date": datetime.date.today().isoformat()}


# ------------------------------------------------------------------ the README's tables

def command(overrides: list[str]) -> str:
    return f"`dlrun {' '.join(overrides)}`" if overrides else "`dlrun` (the default)"


def _pct(row: dict) -> str:
    if row["metric"] == "test/acc":
        digits, mark = (2, " (SWA)") if row.get("weights") == "swa" else (1, "")
        return f"{100 * row['test']:.{digits}f} ± {100 * row['test_std']:.{digits}f}%{mark}"
    return f"MAE {row['test']:.4f} ± {row['test_std']:.4f}"


def machine_line(m: dict) -> str:
    return (f"{m['date']}, {m['cpu']}, {m['cores']} cores, load average {m['load_average_at_start']} at the start, "
            f"torch {m['torch']}")


def _sequence_cells(r: dict, paper: str | None) -> list[str]:
    base = r["baselines"]
    return [f"{r['parameters']:,}", f"{r['test']:.4f} ± {r['test_std']:.4f}", f"{base['naive']:.4f}",
            f"{base['linear']:.4f}",
            f"{r['test'] / base['linear']:.2f}", str(r["epochs"]), f"{r['wall_s']:.0f} s"]


# table -> its columns after `command`, and the cells of a measured row
COLUMNS = {
    "mnist1d": (["parameters", "test accuracy", "paper", "epochs", "wall time"],
                lambda r, paper: [f"{r['parameters']:,}", _pct(r), paper or "-", str(r["epochs"]), f"{r['wall_s']:.0f} s"]),
    "sequence": (["parameters", "test MAE", "naive MAE", "linear MAE", "model / linear", "epochs", "wall time"],
                 _sequence_cells),
    "presets": (["parameters", "FLOPs/sample", "test", "epochs", "wall time"],
                lambda r, paper: [f"{r['parameters']:,}", f"{r['flops_per_sample']:,}", _pct(r), str(r["epochs"]),
                                  f"{r['wall_s']:.0f} s"]),
}


def render(results: dict) -> dict[str, str]:
    """Markdown for each marked block of the README, from results.json (the Performance table is
    bench/run_all.py's)."""
    where = (f"Made by `make results` ({machine_line(results['machine'])}), one thread per run. Test score of the "
             f"best validation epoch (of the averaged weights for a preset that sets trainer.swa_start: marked SWA), "
             f"mean ± std over trainer.seed={','.join(map(str, SEEDS))}; wall time is seed "
             f"{SEEDS[0]}'s whole `dlrun` command on that machine.")
    rows, blocks = results["rows"], {}
    for table, (header, cells) in COLUMNS.items():
        named = [(name, overrides, paper) for name, overrides, paper in TABLES[table] if name in rows]
        # rows rerun alone (--only) after the table was made, on another machine or day: marked, their machine below
        elsewhere = {name: machine_line(rows[name]["machine"]) for name, _, _ in named
                     if rows[name].get("machine", results["machine"]) != results["machine"]}
        marks = {line: "¹²³⁴⁵⁶⁷⁸⁹"[i] for i, line in enumerate(dict.fromkeys(elsewhere.values()))}
        lines = ["| command | " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(header)]
        lines += [f"| {command(overrides)}{' ' + marks[elsewhere[name]] if name in elsewhere else ''} | "
                  + " | ".join(cells(rows[name], paper)) + " |" for name, overrides, paper in named]
        if table == "presets":  # the presets whose data this machine cannot download: their size only
            lines += [f"| {command(overrides)} | {rows[name]['parameters']:,} | - | not run here (needs the download) "
                      "| - | - |" for name, (overrides, _, _) in NEEDS_DOWNLOAD.items() if name in rows]
        notes = [f"{mark} rerun alone by `python scripts/results.py --only "
                 f"{' '.join(name for name in elsewhere if elsewhere[name] == line)}` ({line})."
                 for line, mark in marks.items()]
        blocks[table] = "\n".join([where, "", *lines, *([""] + notes if notes else [])])
    return blocks


def write_readme(blocks: dict[str, str], text: str) -> str:
    for name, body in blocks.items():
        begin, end = f"<!-- generated:{name} begin -->", f"<!-- generated:{name} end -->"
        if begin not in text or end not in text:
            raise SystemExit(f"results: README.md has no {begin} ... {end} block")
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="rows to rerun (the others are kept from results.json)")
    parser.add_argument("--check", action="store_true", help="only check that README.md matches results.json")
    parser.add_argument("--render", action="store_true", help="only rewrite README.md's tables from results.json")
    args = parser.parse_args(argv)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    if args.check:
        if write_readme(render(old), README.read_text()) != README.read_text():
            raise SystemExit("results: README.md's tables differ from results/results.json: run `make results`")
        print("README.md's tables are results/results.json's")
        return
    if args.render:
        README.write_text(write_readme(render(old), README.read_text()))
        return
    rows = dict(old["rows"])
    runs = [(name, overrides) for table in TABLES.values() for name, overrides, _ in table]
    unknown = set(args.only or []) - {name for name, _ in runs} - set(NEEDS_DOWNLOAD)
    if unknown:
        raise SystemExit(f"results: --only {' '.join(sorted(unknown))}: no such row")
    # the table's machine is that of the last full run; a row rerun alone (--only) keeps its own
    results = {"command": "make results", "rows": rows,
               "machine": old["machine"] if args.only and "machine" in old else machine()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs:
            if args.only is None or name in args.only:
                print(f"results: {name}: dlrun {' '.join(overrides)}", flush=True)
                here = machine() if args.only else None  # at the start, as for the table
                row = run_seeds(overrides, Path(tmp))
                rows[name] = {**row, "machine": here} if here else row
    for name, (overrides, shape, classes) in NEEDS_DOWNLOAD.items():
        if args.only is None or name in args.only:
            rows[name] = parameters_only(overrides, shape, classes)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    README.write_text(write_readme(render(results), README.read_text()))
    print(f"wrote {RESULTS.relative_to(ROOT)} and README.md's results tables")


if __name__ == "__main__":
    main()
