"""What each ingredient of a recipe preset buys: the preset, and the preset with ingredients taken back (or added),
each over trainer.seed=0,1,2 with one thread, as `make results` runs its rows (scripts/results.py).

    python scripts/ablation.py                      # the table of the README's "Recipes" section
    python scripts/ablation.py --check              # is the README what results/ablation.json says? (no runs)
    python scripts/ablation.py --render             # rewrite the README's table from results/ablation.json

The figures go to results/ablation.json and into README.md between the `<!-- generated:ablation -->` markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from results import README, ROOT, SEEDS, machine, machine_line, run_seeds, write_readme

ABLATION = ROOT / "results" / "ablation.json"
PRESET = "mnist1d_cnn_swa"
# (what is taken back, the overrides that take it back from the preset)
VARIANTS: list[tuple[str, list[str]]] = [
    ("the preset", []),
    ("best validation epoch instead of the averaged weights", ["trainer.swa_start=0"]),
    ("10% of the training split for validation (as mnist1d_cnn_tuned)", ["dataset.val_fraction=0.1"]),
    ("both: mnist1d_cnn_tuned itself", ["trainer.swa_start=0", "dataset.val_fraction=0.1"]),
    ("no label smoothing", ["trainer.label_smoothing=0"]),
    ("shifts of up to 4 steps and 80 epochs, averaged over the last 21", ["dataset.crop_padding=4",
                                                                          "trainer.epochs=80", "trainer.swa_start=60"]),
    ("the same, best validation epoch instead", ["dataset.crop_padding=4", "trainer.epochs=80", "trainer.swa_start=0"]),
]


def render(ablation: dict) -> str:
    rows = ablation["rows"]
    full = rows[0]["test"]
    lines = [f"Made by `python scripts/ablation.py` ({machine_line(ablation['machine'])}), one thread per run: "
             f"`dlrun experiment={PRESET}` with ingredients taken back (or added), test accuracy (the averaged weights "
             f"where trainer.swa_start is set, else the best validation epoch's), mean ± std over "
             f"trainer.seed={','.join(map(str, SEEDS))}.", "",
             "| variant | overrides | test accuracy | change | wall time |", "| --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        change = "-" if row["overrides"] == [] else f"{100 * (row['test'] - full):+.2f}"
        overrides = " ".join(f"`{o}`" for o in row["overrides"]) or "-"
        lines.append(f"| {row['variant']} | {overrides} | {100 * row['test']:.2f} ± {100 * row['test_std']:.2f}% "
                     f"| {change} | {row['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md matches ablation.json")
    parser.add_argument("--render", action="store_true", help="only rewrite README.md's table from ablation.json")
    args = parser.parse_args(argv)
    if args.render:
        README.write_text(write_readme({"ablation": render(json.loads(ABLATION.read_text()))}, README.read_text()))
        return
    if args.check:
        ablation = json.loads(ABLATION.read_text())
        if write_readme({"ablation": render(ablation)}, README.read_text()) != README.read_text():
            raise SystemExit("ablation: README.md's table differs from results/ablation.json: run scripts/ablation.py")
        print("README.md's ablation table is results/ablation.json's")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, overrides in VARIANTS:
            print(f"ablation: {variant}: dlrun experiment={PRESET} {' '.join(overrides)}", flush=True)
            row = run_seeds([f"experiment={PRESET}", *overrides], Path(tmp))
            rows.append({**row, "variant": variant, "overrides": overrides})
    ablation = {"command": "python scripts/ablation.py", "machine": machine(), "preset": PRESET, "rows": rows}
    ABLATION.write_text(json.dumps(ablation, indent=1) + "\n")
    README.write_text(write_readme({"ablation": render(ablation)}, README.read_text()))
    print(f"wrote {ABLATION.relative_to(ROOT)} and README.md's ablation table "
          f"(the preset: {100 * statistics.fmean(rows[0]['tests']):.2f}%)")


if __name__ == "__main__":
    main()
