"""Helpers shared by the benchmarks: timing subprocesses and printing results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DLRUN = str(Path(sys.executable).with_name("dlrun"))
sys.path.insert(0, str(ROOT / "tests"))  # datafiles: writers of the real on-disk formats


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    """Wall seconds of one subprocess run; fails loudly if the command fails."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def paired(commands: dict[str, Callable[[int], list[str]]], cwd: Path, repeats: int,
           env: dict | None = None) -> dict[str, list[float]]:
    """Wall seconds of each command, `repeats` times, the commands alternating in a new order each
    repetition (the machine drifts; neither side always runs first). `commands` maps a label to a
    function of the repetition that returns the command (so each run can have its own folder)."""
    times: dict[str, list[float]] = {label: [] for label in commands}
    labels = list(commands)
    for rep in range(repeats):
        for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
            times[label].append(timed(commands[label](rep), cwd, env))
    return times


def report(name: str, times: dict[str, list[float]], ratio_label: str, numerator: str, denominator: str,
           extra: dict) -> dict:
    """Print each side's median wall seconds with its min-max, the ratio of two medians, and one JSON
    line (the medians under their labels, the ranges under "<label> range")."""
    width = max(map(len, times)) + 2
    medians = {label: statistics.median(t) for label, t in times.items()}
    for label, t in times.items():
        print(f"{label:<{width}}{medians[label]:>9.2f} s  ({min(t):.2f}-{max(t):.2f}, {len(t)} runs)")
    ratio = medians[numerator] / medians[denominator]
    print(f"{ratio_label}: {ratio:.2f}x")
    result = {"bench": name, **medians, **{f"{label} range": [min(t), max(t)] for label, t in times.items()},
              "ratio": ratio, "repeats": len(next(iter(times.values()))), "load_average": os.getloadavg()[0], **extra}
    print(json.dumps(result))
    return result


def loop_settings(**changes):
    """dlrun's trainer settings (conf/trainer/default.yaml's values) with `changes`, as its loop reads them."""
    from omegaconf import OmegaConf

    from dlrun.config.schema import with_current_keys
    from dlrun.train import LoopSettings

    return LoopSettings.of(with_current_keys(OmegaConf.create({})).trainer, "classification", **changes)
