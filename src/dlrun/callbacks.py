"""Hydra callbacks: check the output folder before a run, summarise a sweep after it.

Registered in conf/config.yaml under `hydra.callbacks`. Hydra imports this module
for every command, so it imports nothing heavy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dlrun.config import ConfigError, dir_problem, resume_checkpoint
from dlrun.report import find_runs


def _check_output_dir(key: str, path: str) -> None:
    problem = dir_problem(path)
    if problem is not None:
        raise SystemExit(f"dlrun: error: {key}={path} cannot be used as the output folder: {problem}")


class DlrunCallback(Callback):
    """Checks what Hydra would otherwise fail on with a traceback, before it creates any folder;
    summarises a sweep at its end."""

    def __init__(self) -> None:
        self.earlier_jobs: set[str] = set()  # job folders a continued sweep (hparams_search) had already

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("resume"):
            try:
                resume_checkpoint(config.resume)
            except ConfigError as err:
                raise SystemExit(f"dlrun: error: {err}") from None
        _check_output_dir("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_output_dir("hydra.sweep.dir", config.hydra.sweep.dir)
        self.earlier_jobs = {job.name for job in find_runs([config.hydra.sweep.dir])}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write sweep_summary.json (one row per job), print it, exit non-zero if a job of this sweep failed."""
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sweep_rows(sweep_dir)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps({"sweep_dir": str(sweep_dir), "jobs": rows}, indent=2) + "\n")
        print_sweep(rows, sweep_dir)
        ran = [row for row in rows if row["job"] not in self.earlier_jobs]
        failed = [row for row in ran if row["status"] != "completed"]
        if failed:
            names = ", ".join(f"#{row['job']} ({' '.join(row['overrides'])})" for row in failed)
            raise SystemExit(f"dlrun: {len(failed)} of {len(ran)} jobs did not complete: {names}")


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder, in job order (the same discovery as dlrun-report's)."""
    rows = []
    for job in find_runs([str(sweep_dir)]):
        s = json.loads((job / "summary.json").read_text())
        rows.append(
            {
                "job": job.name,
                "overrides": s.get("overrides", []),
                "status": s.get("status"),
                "monitor": s.get("monitor", {}).get("metric"),
                "monitor_value": s.get("monitor_value"),
                "wall_time_s": s.get("wall_time_s"),
                "error": s.get("error"),
            }
        )
    return rows


def print_sweep(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep: {sweep_dir}", header_style="bold")
    for column in ("job", "overrides", "status", "monitored", "wall time"):
        table.add_column(column, justify="right" if column in ("monitored", "wall time") else "left")
    for row in rows:
        value = row["monitor_value"]
        table.add_row(
            row["job"],
            " ".join(row["overrides"]),
            row["status"] if row["status"] == "completed" else f"[red]{row['status']}[/red]",
            "-" if value is None else f"{row['monitor']} {value:.4f}",
            "-" if row["wall_time_s"] is None else f"{row['wall_time_s']:.1f} s",
        )
    Console(file=sys.stdout).print(table)
