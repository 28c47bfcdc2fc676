"""What each ingredient of a recipe preset buys: the preset, and the preset with ingredients taken back (or added),
each over trainer.seed=0,1,2 with one thread, as `make results` runs its rows (scripts/results.py).

    python scripts/ablation.py                      # every recipe's table in the README's "Recipes" section
    python scripts/ablation.py mnist1d_gru_swa      # one recipe's table; the others are kept
    python scripts/ablation.py --jobs 2             # two runs at a time (one thread each: for a 2-core machine)
    python scripts/ablation.py --check              # is the README what results/ablation.json says? (no runs)
    python scripts/ablation.py --render             # rewrite the README's tables from results/ablation.json

The figures go to results/ablation.json (per preset, with its machine and date) and into README.md between the
`<!-- generated:ablation_<preset> -->` markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from results import README, ROOT, SEEDS, machine, machine_line, run_row, seed_overrides, seeds_row, write_readme

ABLATION = ROOT / "results" / "ablation.json"
SWA_TO_BEST = "best validation epoch instead of the averaged weights"
# preset -> its variants: (what is taken back, the overrides that take it back from the preset)
ABLATIONS: dict[str, list[tuple[str, list[str]]]] = {
    "mnist1d_cnn_swa": [
        ("the preset", []),
        (SWA_TO_BEST, ["trainer.swa_start=0"]),
        ("10% of the training split for validation (as mnist1d_cnn_tuned)", ["dataset.val_fraction=0.1"]),
        ("no label smoothing", ["trainer.label_smoothing=0"]),
        ("60 epochs, averaged over the last 16 (the recipe until 2026-12-02)", ["trainer.epochs=60",
                                                                               "trainer.swa_start=45"]),
    ],
    "mnist1d_gru_swa": [
        ("the preset", []),
        ("one step at a time (40 steps of the recurrence)", ["model.patch_size=1"]),
        ("four steps at a time (10 steps)", ["model.patch_size=4"]),
        (SWA_TO_BEST, ["trainer.swa_start=0"]),
    ],
    "mnist1d_transformer": [
        ("the preset", []),
        ("no convolutions before the tokens (a plain transformer)", ["model.stem=[]"]),
        (SWA_TO_BEST, ["trainer.swa_start=0"]),
        ("no shifts", ["dataset.crop_padding=0"]),
        ("no label smoothing", ["trainer.label_smoothing=0"]),
    ],
}


def render(preset: str, ablation: dict) -> str:
    rows = ablation["rows"]
    full = rows[0]["test"]
    at_once = ablation.get("jobs", 1)
    runs = "one thread per run" + (f", {at_once} runs at a time" if at_once > 1 else "")
    lines = [f"Made by `python scripts/ablation.py {preset}` ({machine_line(ablation['machine'])}), {runs}: "
             f"`dlrun experiment={preset}` with ingredients taken back (or added), test accuracy (the averaged weights "
             f"where trainer.swa_start is set, else the best validation epoch's), mean ± std over "
             f"trainer.seed={','.join(map(str, SEEDS))}.", "",
             "| variant | overrides | test accuracy | change | wall time |", "| --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        change = "-" if row["overrides"] == [] else f"{100 * (row['test'] - full):+.2f}"
        overrides = " ".join(f"`{o}`" for o in row["overrides"]) or "-"
        lines.append(f"| {row['variant']} | {overrides} | {100 * row['test']:.2f} ± {100 * row['test_std']:.2f}% "
                     f"| {change} | {row['wall_s']:.0f} s |")
    return "\n".join(lines)


def blocks(recorded: dict) -> dict[str, str]:
    """The README's marked blocks, one per preset recorded in ablation.json."""
    return {f"ablation_{preset}": render(preset, ablation) for preset, ablation in recorded.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="*", metavar="PRESET",
                        help=f"the recipes to measure (default: all of {', '.join(ABLATIONS)})")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each (default 1)")
    parser.add_argument("--check", action="store_true", help="only check that README.md matches ablation.json")
    parser.add_argument("--render", action="store_true", help="only rewrite README.md's tables from ablation.json")
    args = parser.parse_args(argv)
    unknown = set(args.presets) - set(ABLATIONS)
    if unknown:
        parser.error(f"no ablation for {', '.join(sorted(unknown))}; the recipes: {', '.join(ABLATIONS)}")
    recorded = json.loads(ABLATION.read_text()) if ABLATION.exists() else {}
    if args.render:
        README.write_text(write_readme(blocks(recorded), README.read_text()))
        return
    if args.check:
        if write_readme(blocks(recorded), README.read_text()) != README.read_text():
            raise SystemExit("ablation: README.md's tables differ from results/ablation.json: run scripts/ablation.py")
        print("README.md's ablation tables are results/ablation.json's")
        return
    for preset in args.presets or ABLATIONS:
        with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=args.jobs) as pool:
            # every run of the preset's table queued at once: `jobs` run at a time, across variants
            started = machine()
            commands = [[f"experiment={preset}", *overrides] for _, overrides in ABLATIONS[preset]]
            queued = [[pool.submit(run_row, seed_overrides(command, seed), Path(tmp)) for seed in SEEDS]
                      for command in commands]
            rows = []
            for (variant, overrides), command, runs in zip(ABLATIONS[preset], commands, queued):
                row = seeds_row(command, [run.result() for run in runs])
                rows.append({**row, "variant": variant, "overrides": overrides})
                print(f"ablation: {variant}: {100 * row['test']:.2f} ± {100 * row['test_std']:.2f}% "
                      f"(dlrun experiment={preset} {' '.join(overrides)})", flush=True)
        recorded[preset] = {"command": f"python scripts/ablation.py {preset}", "machine": started, "jobs": args.jobs,
                            "rows": rows}
        ABLATION.write_text(json.dumps(recorded, indent=1) + "\n")  # after each preset: a later failure keeps it
        README.write_text(write_readme(blocks(recorded), README.read_text()))
        print(f"wrote {ABLATION.relative_to(ROOT)} and README.md's table for {preset} "
              f"(the preset: {100 * statistics.fmean(rows[0]['tests']):.2f}%)")


if __name__ == "__main__":
    main()
