"""Helpers shared by the benchmarks: timing subprocesses and printing results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def median_time(cmd: list[str], cwd: Path, repeats: int, env: dict | None = None) -> float:
    return statistics.median(timed(cmd, cwd, env) for _ in range(repeats))


def report(name: str, rows: list[tuple[str, float]], ratio_label: str, ratio: float, extra: dict) -> dict:
    """Print a small table of (what, seconds), the ratio, and one JSON line."""
    width = max(len(r[0]) for r in rows) + 2
    for label, seconds in rows:
        print(f"{label:<{width}}{seconds:>9.2f} s")
    print(f"{ratio_label}: {ratio:.2f}x")
    result = {"bench": name, **{label: seconds for label, seconds in rows}, "ratio": ratio, **extra}
    print(json.dumps(result))
    return result
