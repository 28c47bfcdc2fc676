"""Hydra callbacks: claim or check the output folder before a run, summarise a sweep after it.

Registered in conf/config.yaml under `hydra.callbacks`. Hydra imports this module
for every command, so it imports nothing heavy.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from dlrun import rundir
from dlrun.config.validate import dir_problem
from dlrun.errors import DlrunError
from dlrun.rundir import RunDir


class DlrunCallback(Callback):
    """Checks what Hydra would otherwise fail on with a traceback, and that the run folder is free,
    before Hydra writes anything into it; summarises a sweep at its end."""

    def __init__(self) -> None:
        self.earlier_jobs: set[str] = set()  # job folders a continued sweep (hparams_search) had already

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            if config.get("resume"):
                rundir.resume_checkpoint(config.resume)
                rundir.check_not_in_use(RunDir(Path(config.resume).expanduser().resolve()))
            else:
                claim_output_dir(config, "run")
        except DlrunError as err:
            raise SystemExit(f"dlrun: error: {err}") from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            claim_output_dir(config, "sweep")
        except DlrunError as err:
            raise SystemExit(f"dlrun: error: {err}") from None
        self.earlier_jobs = {job.name for job in rundir.find_runs([config.hydra.sweep.dir])}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the sweep summary (one row per job), print it, exit non-zero if a job of this sweep failed."""
        rows = write_sweep_summary(Path(config.hydra.sweep.dir))
        ran = [row for row in rows if row["job"] not in self.earlier_jobs]
        failed = [row for row in ran if row["status"] != "completed"]
        if failed:
            names = ", ".join(f"#{row['job']} ({' '.join(row['overrides'])})" for row in failed)
            raise SystemExit(f"dlrun: {len(failed)} of {len(ran)} jobs did not complete: {names}")


def claim_output_dir(config: DictConfig, mode: str) -> None:
    """`hydra.<mode>.dir` (run or sweep): a timestamped pattern (`${now:...}`, the default) names a
    fresh folder, made unique here (`-1`, `-2`, ... appended when another run took the name in the
    same second); an explicit run folder must not hold another run."""
    key = f"hydra.{mode}.dir"
    path = str(config.hydra[mode].dir)
    problem = dir_problem(path)
    if problem is not None:
        raise DlrunError(f"{key}={path} cannot be used as the output folder: {problem}")
    if "${now:" not in OmegaConf.to_container(config.hydra[mode], resolve=False)["dir"]:
        if mode == "run":
            rundir.check_not_in_use(RunDir(Path(path)))
            rundir.check_fresh(RunDir(Path(path)))
        return
    claimed = str(rundir.claim_fresh(Path(path)))
    if claimed != path:
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra[mode].dir = claimed
            # sweep jobs recompose their config from the sweep's overrides: they must name the folder too
            config.hydra.overrides.hydra.append(f"{key}='{claimed}'")


def write_sweep_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """The sweep summary file (one row per job, runs whose process is gone recorded as failed), printed too."""
    rows = sweep_rows(sweep_dir)
    rundir.write_json(rundir.sweep_summary(sweep_dir), {"sweep_dir": str(sweep_dir), "jobs": rows})
    print_sweep(rows, sweep_dir)
    return rows


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder, in job order (the same discovery as dlrun-report's)."""
    rows = []
    for job in rundir.find_runs([str(sweep_dir)]):
        s = rundir.settle(job)
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
