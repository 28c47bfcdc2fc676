"""Hydra callbacks: claim or check the output folder before a run, summarise a sweep after it.

Registered in conf/config.yaml under `hydra.callbacks`. Hydra imports this module
for every command, so it imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from dlrun import rundir
from dlrun.config.validate import dir_problem, validate
from dlrun.errors import ConfigError, DlrunError, signal_exit_code
from dlrun.rundir import RunDir


class DlrunCallback(Callback):
    """Checks what Hydra would otherwise fail on with a traceback, and that the run folder is free,
    before Hydra writes anything into it; summarises a sweep at its end."""

    def __init__(self) -> None:
        self.earlier_jobs: dict[str, str] = {}  # job folders (and their status) a continued sweep had already
        self.started_at = 0.0
        self.sweep_id = ""  # written into this sweep's runs: other workers of a shared study write theirs
        self.sweep_started = False  # Hydra calls on_multirun_end even when on_multirun_start refused the sweep

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            continue_restarted(config)
            if config.get("resume"):  # the run continues with its saved config
                rundir.resume_checkpoint(config.resume)
                folder = RunDir(Path(config.resume).expanduser().resolve())
                rundir.check_not_in_use(folder)
                rundir.check_links(folder)  # before Hydra writes .hydra/resume-<time>/ into it
                if (problem := dir_problem(folder.path)) is not None:  # read-only: Hydra's writes would fail
                    raise ConfigError(f"resume={config.resume}: the run folder cannot be written ({problem})")
            else:
                check_set(config, "run")
                validate(config)  # bad input is refused before the run folder exists
                claim_output_dir(config, "run")
        except DlrunError as err:
            raise SystemExit(f"dlrun: error: {err}") from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_set(config, "sweep")
            claim_output_dir(config, "sweep")
            check_same_sweep(config)
        except DlrunError as err:
            raise SystemExit(f"dlrun: error: {err}") from None
        self.earlier_jobs = {job.name: rundir.read_summary(job).get("status")
                             for job in rundir.find_runs([config.hydra.sweep.dir])}
        self.started_at = time.time()
        self.sweep_id = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        with read_write(config.hydra), open_dict(config.hydra):  # jobs compose their config from these overrides
            config.hydra.overrides.hydra.append(f"++hydra.job.env_set.{rundir.SWEEP_ID}={override_value(self.sweep_id)}")
        self.sweep_started = True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the sweep summary (one row per job), print it, exit non-zero if a job of this sweep failed."""
        if not self.sweep_started or not Path(config.hydra.sweep.dir).is_dir():  # refused, or failed before any
            return  # job (say the sweeper's storage): nothing ran, and nothing is written
        rows = write_sweep_summary(Path(config.hydra.sweep.dir))
        ran = [row for row in rows if row["sweep_id"] == self.sweep_id
               or (row["sweep_id"] is None and row["job"] not in self.earlier_jobs)]
        self.tell_what_continued(Path(config.hydra.sweep.dir), ran)
        stopped = [row for row in ran if row["status"] == "interrupted"]
        if stopped:  # a signal stopped the sweep (the job said so): exit as the signal says
            raise SystemExit(signal_exit_code(signal.Signals[stopped[-1]["signal"] or "SIGINT"]))
        failed = [row for row in ran if row["status"] != "completed"]
        if failed:
            names = ", ".join(f"#{row['job']}{' not started' if row['status'] == 'not started' else ''} "
                              f"({' '.join(row['overrides'])}){why_failed(row, config)}" for row in failed)
            raise SystemExit(f"dlrun: {len(failed)} of {len(ran)} jobs did not complete: {names}")

    def tell_what_continued(self, sweep_dir: Path, ran: list[dict[str, Any]]) -> None:
        """One line for a sweep started again in its folder: which jobs it found completed (Hydra launched them
        again, wrote their .hydra/ anew, and the job kept its run), which it continued, which it ran anew."""
        kept = [job for job, status in self.earlier_jobs.items() if status == "completed"
                and RunDir(sweep_dir / job).hydra_overrides.is_file()
                and RunDir(sweep_dir / job).hydra_overrides.stat().st_mtime >= self.started_at]
        continued = [row["job"] for row in ran if row["job"] in self.earlier_jobs]
        if not kept and not continued:
            return
        fresh = [row["job"] for row in ran if row["job"] not in self.earlier_jobs]
        print(f"dlrun: the sweep in {sweep_dir} was started again: {len(kept)} job(s) completed earlier, kept "
              f"({' '.join('#' + j for j in kept) or '-'}); {len(continued)} continued from their checkpoint or "
              f"started again ({' '.join('#' + j for j in continued) or '-'}); {len(fresh)} new "
              f"({' '.join('#' + j for j in fresh) or '-'})", file=sys.stderr)


def why_failed(row: dict[str, Any], config: DictConfig) -> str:
    """What to do about a job that failed for a reason the user can act on (today: a Slurm job out of time more
    often than it may be requeued, as submitit says it), else nothing."""
    if "timed-out too many times" not in str(row.get("error")):
        return ""
    folder = Path(config.hydra.sweep.dir) / row["job"]
    return (f": out of time more often than hydra.launcher.max_num_timeout allows (its folder {folder} keeps its "
            "last checkpoint): raise hydra.launcher.timeout_min, set trainer.checkpoint_every=N so each requeue keeps "
            f"its progress, and run the same command with hydra.sweep.dir={config.hydra.sweep.dir} to continue it")


def check_same_sweep(config: DictConfig) -> None:
    """A sweep started again in its folder (`hydra.sweep.dir=<the same>`) keeps what it completed and continues
    what it began, so it must be the same sweep: the same overrides as the start that wrote the folder's
    multirun.yaml. (A search, hparams_search=..., continues its study with new trials instead.)"""
    earlier = Path(config.hydra.sweep.dir) / "multirun.yaml"
    if not earlier.is_file() or str(config.hydra.sweeper.get("_target_", "")).startswith("dlrun.hydra_ext.search"):
        return
    saved = rundir.read_yaml(earlier)
    before = ((saved.get("hydra") or {}).get("overrides") or {}).get("task") if isinstance(saved, dict) else None
    if before is not None and list(before) != list(config.hydra.overrides.task):
        raise DlrunError(f"hydra.sweep.dir={config.hydra.sweep.dir} holds a sweep of other overrides "
                         f"({' '.join(before)}); a sweep is started again in its folder only with the same command "
                         "(it keeps the jobs that completed and continues the others): give another hydra.sweep.dir")


def continue_restarted(config: DictConfig) -> None:
    """A single run that torchrun (--max-restarts) or Slurm (a requeue) started again continues the run its earlier
    start made, as `resume=<folder>` would: in the folder `hydra.run.dir` names, or, when that is timestamped (a
    new name at every start), in the run under its root that this torchrun's rendezvous id began."""
    if config.get("resume") or (who := rundir.restarted()) is None:
        return
    pattern = OmegaConf.to_container(config.hydra.run, resolve=False)["dir"]
    if "${now:" in pattern:
        found = rundir.elastic_run(timestamp_root(pattern))
    else:
        found = Path(config.hydra.run.dir) if rundir.continues_after_restart(RunDir(Path(config.hydra.run.dir))) else None
    if found is None:
        print(f"dlrun: {who}: no run of this command to continue (name its folder with hydra.run.dir=..., or "
              "torchrun's rendezvous with --rdzv-id or --standalone): starting afresh", file=sys.stderr)
        return
    print(f"dlrun: {who}: continuing {found} from its last checkpoint", file=sys.stderr)
    with read_write(config), open_dict(config):
        config.resume = str(found)


def timestamp_root(pattern: str) -> Path:
    """The folder under which a timestamped `hydra.run.dir` pattern names its runs: what comes before its first
    `${...}` (conf/config.yaml's default, `outputs/${now:...}/${now:...}` inside its resume choice: `outputs`)."""
    default = re.fullmatch(r"\$\{dlrun\.if_resume:\$\{resume\},\$\{resume\},(.*)\}", pattern)
    static = (default.group(1) if default else pattern).split("${")[0]
    return Path(static if static.endswith("/") else os.path.dirname(static) or ".")


# How to set a mandatory value (`???` in conf/) on the command line; any other key: `<key>=<value>`.
HOW_TO_SET = {
    "model._target_": "name your model class, e.g. model._target_=my_pkg.MyNet (importable from where dlrun runs)",
    "dataset.root": "name the folder of class sub-folders of images, e.g. dataset.root=/path/to/images",
}


def check_set(config: DictConfig, mode: str) -> None:
    """Refuse a config with a mandatory value left unset (`???`), before the job starts (and imports
    torch) and before Hydra makes a folder. In a sweep (`mode` "sweep"), keys the sweep sets per job
    are left to the jobs."""
    swept = swept_keys(config) if mode == "sweep" else set()
    unset = [k for k in unset_keys(config) if not any(k == s or k.startswith((f"{s}.", f"{s}[")) for s in swept)]
    if unset:
        raise ConfigError("; ".join(f"{k} is not set: {HOW_TO_SET.get(k, f'set it, e.g. {k}=<value>')}" for k in unset))


def unset_keys(config: DictConfig) -> list[str]:
    """Keys outside Hydra's own `hydra.*` whose value is `???`, in config order (interpolations are not
    resolved: `${...}` pointing at an unset key counts once, as that key)."""
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        keys = range(len(node)) if OmegaConf.is_list(node) else list(node.keys())
        for k in keys:
            name = f"{prefix}[{k}]" if isinstance(k, int) else f"{prefix}.{k}" if prefix else str(k)
            if name == "hydra" or OmegaConf.is_interpolation(node, k):
                continue
            if OmegaConf.is_missing(node, k):
                found.append(name)
                continue
            value = node[k]
            if OmegaConf.is_config(value):
                walk(value, name)

    walk(config, "")
    return found


def swept_keys(config: DictConfig) -> set[str]:
    """Keys (or config groups) a sweep sets per job: its sweep overrides (`key=a,b`, `range(...)`, ...)
    and the sweeper's `hydra.sweeper.params`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(task)) if o.is_sweep_override()}
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    return keys | (set(params.keys()) if OmegaConf.is_dict(params) else set())


def claim_output_dir(config: DictConfig, mode: str) -> None:
    """`hydra.<mode>.dir` (run or sweep): a timestamped pattern (`${now:...}`, the default) names a
    fresh folder, made unique here (`-1`, `-2`, ... appended when another run took the name in the
    same second); an explicit run folder must not hold another run."""
    key = f"hydra.{mode}.dir"
    path = str(config.hydra[mode].dir)
    if not path.strip():  # Path("") is the working directory
        raise DlrunError(f"{key} is empty; name the folder, e.g. {key}=outputs/my-run")
    problem = dir_problem(path)
    if problem is not None:
        raise DlrunError(f"{key}={path} cannot be used as the output folder: {problem}")
    if "${now:" not in OmegaConf.to_container(config.hydra[mode], resolve=False)["dir"]:
        if mode == "run":
            rundir.check_not_in_use(RunDir(Path(path)))
            rundir.check_own(RunDir(Path(path)))
            rundir.check_fresh(RunDir(Path(path)))
        return
    claimed = str(rundir.claim_fresh(Path(path)))
    if claimed != path:
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra[mode].dir = claimed
            # sweep jobs recompose their config from the sweep's overrides: they must name the folder too
            config.hydra.overrides.hydra.append(f"{key}={override_value(claimed)}")


def override_value(value: str) -> str:
    """`value` as a Hydra override's value: as it is when it holds only plain path characters, else
    in quotes, with Hydra's escapes (a quote, and backslashes before a quote or the end)."""
    if re.fullmatch(r"[A-Za-z0-9_./:+-]+", value):
        return value
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
    return f"'{escaped}'"


def write_sweep_summary(sweep_dir: Path, planned: dict[str, list[str]] | None = None,
                        why: str = "") -> list[dict[str, Any]]:
    """The sweep summary file (one row per job, runs whose process is gone recorded as failed), printed too;
    `planned` (job number: overrides) adds a `not started` row, with `why`, for each job that never made its
    folder (a parallel sweep whose pool was ended); a later summary of the same sweep keeps those rows."""
    rows = sweep_rows(sweep_dir)
    started = {row["job"] for row in rows}
    waiting = {job: {"overrides": o, "error": why} for job, o in planned.items()} if planned else not_started(sweep_dir)
    rows += [{"job": job, "status": "not started", "monitor": None, "monitor_value": None, "wall_time_s": None,
              "signal": None, "sweep_id": None, **row} for job, row in waiting.items() if job not in started]
    rows.sort(key=lambda row: (len(row["job"]), row["job"]))
    rundir.write_json(rundir.sweep_summary(sweep_dir), {"sweep_dir": str(sweep_dir), "jobs": rows})
    print_sweep(rows, sweep_dir)
    return rows


def not_started(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The jobs a sweep summary already lists as never started (the parallel launcher wrote them when its pool
    was ended), with their overrides and error."""
    path = rundir.sweep_summary(sweep_dir)
    try:
        jobs = json.loads(path.read_text())["jobs"] if path.is_file() else []
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {row["job"]: {"overrides": row.get("overrides", []), "error": row.get("error")} for row in jobs
            if isinstance(row, dict) and row.get("status") == "not started"}


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
                "signal": s.get("signal"),
                "sweep_id": s.get("sweep_id"),
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
