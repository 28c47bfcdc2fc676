"""Hydra's launchers, as dlrun runs them.

`launcher=local_parallel`: Hydra's joblib launcher. When one of its worker processes dies
(killed, out of memory), joblib ends the whole pool; `JoblibLauncher` then records every job
left without an end as failed, writes the sweep summary and exits with one line.

`launcher=submitit_local` and `launcher=slurm`: Hydra's submitit launchers, with requeued jobs that resume.

When a job times out (or is preempted), submitit catches the scheduler's signal, asks the
launcher's `checkpoint(...)` for what to run next and requeues it. Hydra's launcher resubmits the
job's original arguments, so the job would start over in its folder; these subclasses add
`resume=<the job's run folder>` once that folder has a checkpoint, so the requeued job continues
from its last checkpoint (written at every epoch end and every `trainer.checkpoint_every` steps).

Registered as Hydra plugins through the `hydra.plugins` entry points in pyproject.toml; imported
by Hydra at every start, so nothing heavy at module level.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher import joblib_launcher
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from dlrun.rundir import RunDir


class JoblibLauncher(joblib_launcher.JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from dlrun.hydra_ext.callbacks import write_sweep_summary

        try:
            return super().launch(job_overrides, initial_job_idx)
        except Exception as err:  # jobs' own errors come back as failed JobReturns; this is the pool's
            # every planned job in the sweep summary, those the pool never started too; the sweep's end
            # (callbacks.on_multirun_end, which Hydra calls next) names each unfinished job in one line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            write_sweep_summary(Path(str(self.config.hydra.sweep.dir)),
                                {str(initial_job_idx + i): list(o) for i, o in enumerate(job_overrides)},
                                f"the parallel sweep stopped before this job started ({type(err).__name__}: {reason})")
            raise


class ResumeOnRequeue:
    def checkpoint(self, overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        import submitit
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():  # the job had started (the signal may come earlier)
            run_dir = HydraConfig.get().runtime.output_dir
            if RunDir(Path(run_dir)).last.is_file():
                overrides = [o for o in overrides if not o.startswith("resume=")] + [f"resume={run_dir}"]
        return submitit.helpers.DelayedSubmission(self, overrides, *args, **kwargs)


class LocalLauncher(ResumeOnRequeue, submitit_launcher.LocalLauncher):
    pass


class SlurmLauncher(ResumeOnRequeue, submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Hydra's Slurm launch, with one-line errors where Slurm is missing, refuses the jobs, holds them back
        for good or ends them without a result, and job states read from squeue where the cluster keeps no
        accounting (sacct refuses)."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        if shutil.which("sbatch") is None:
            raise SystemExit("dlrun: error: launcher=slurm submits with Slurm's sbatch, which is not on PATH "
                             "here; launcher=submitit_local runs the same jobs on this machine")
        sweep_dir = str(self.config.hydra.sweep.dir)
        try:
            with job_states_without_accounting(), cancel_if_never_run(Path(sweep_dir) / ".submitit") as never:
                return super().launch(job_overrides, initial_job_idx)
        except (FailedJobError, UncompletedJobError) as err:
            if never:  # held back for good, and cancelled here
                said = (f"Slurm cannot run job {never[0]}: {never[1]} (it asks for more than the partition allows: "
                        "hydra.launcher.nodes, tasks_per_node, timeout_min, mem_gb or partition); it was cancelled")
            elif isinstance(err, FailedJobError):  # sbatch refused
                said = "Slurm did not take the jobs: " + "; ".join(line.strip() for line in str(err).strip().splitlines())
                if "Unable to contact slurm controller" in said:
                    said += (" (is slurmctld up and reachable from here? sbatch reads the cluster from SLURM_CONF or "
                             "/etc/slurm/slurm.conf)")
            else:  # the job ended without a result: timed out too often, cancelled, its node lost
                said = uncompleted(str(err), sweep_dir, initial_job_idx)
            # printed now: the sweep's end (callbacks.on_multirun_end) then writes the summary and sets the exit code
            print(f"dlrun: error: {said}", file=sys.stderr)
            raise SystemExit(1) from None


# Why Slurm keeps a job pending that it will never start (the cluster accepts such jobs unless
# EnforcePartLimits is set, and leaves them waiting with this reason)
NEVER_RUN = {"PartitionNodeLimit", "PartitionTimeLimit", "PartitionConfig", "BadConstraints",
             "AssocMaxNodesPerJobLimit", "AssocMaxWallDurationPerJobLimit", "QOSMaxNodePerJobLimit",
             "QOSMaxWallDurationPerJobLimit", "QOSMaxCpuPerJobLimit", "AssocMaxCpuPerJobLimit"}


@contextmanager
def cancel_if_never_run(submitit_dir: Path, every_s: float = 10.0) -> Iterator[list[str]]:
    """While the block waits for the sweep's jobs, look at their pending reasons every `every_s`; a job Slurm will
    never start is cancelled (so the wait ends), and the yielded list gets its id and the reason."""
    found: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            ids = [p.name for p in submitit_dir.glob("*") if p.name.isdigit()] if submitit_dir.is_dir() else []
            if not ids:
                continue
            out = subprocess.run(["squeue", "--noheader", "--format=%i|%r", f"--jobs={','.join(ids)}"],
                                 capture_output=True, text=True, timeout=60).stdout
            held = [line.split("|") for line in out.split() if line.split("|")[-1] in NEVER_RUN]
            if held:
                found.extend(held[0])
                subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
                return

    thread = threading.Thread(target=watch, name="dlrun-slurm-pending", daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()


def uncompleted(message: str, sweep_dir: str, initial_job_idx: int) -> str:
    """submitit's UncompletedJobError (the job's id, its state, then its whole log) as one line: which job, where
    its run folder is, and what to change when it ran out of time."""
    found = re.search(r"Job (\S+) \(task: \d+\).*?has not produced any output \(state: (\S+)\)", message, re.S)
    if found is None:
        return message.strip().splitlines()[0]
    slurm_id, state = found.groups()
    number = initial_job_idx + int(slurm_id.split("_")[1]) if "_" in slurm_id else initial_job_idx
    advice = ("; it ran out of time more often than hydra.launcher.max_num_timeout allows: raise "
              "hydra.launcher.timeout_min, and set trainer.checkpoint_every=N so each requeue keeps its progress"
              if state == "TIMEOUT" else "")
    return (f"Slurm job {slurm_id} (sweep job #{number}, its folder under {sweep_dir}) ended without a result "
            f"(state {state}){advice}; its log: {sweep_dir}/.submitit/{slurm_id.split('_')[0]}/")


@contextmanager
def job_states_without_accounting() -> Iterator[None]:
    """submitit reads job states with sacct, which fails on a cluster without accounting (common on small ones):
    every poll then prints sacct's complaint and three warnings, and a job that dies without a result is never
    seen to end. There, for this launch, submitit's Slurm jobs read their states from squeue instead (submitit
    keeps its watcher on the job class)."""
    from submitit.slurm.slurm import SlurmJob

    if accounting_enabled():
        yield
        return
    kept = SlurmJob.watcher
    # squeue forgets a finished job after MinJobAge (300 s by default): ask at least every two minutes
    SlurmJob.watcher = squeue_watcher(min(kept._delay_s, 120))
    try:
        yield
    finally:
        SlurmJob.watcher = kept


def accounting_enabled() -> bool:
    """Whether the cluster keeps job accounting (sacct answers); assumed so when scontrol cannot tell."""
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return "accounting_storage/none" not in config


def squeue_watcher(delay_s: int) -> Any:
    """A submitit watcher that asks squeue (defined here: submitit is imported only when a launch needs it)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWatcher(SlurmInfoWatcher):
        """Job states from `squeue --states=all` (finished jobs too, for MinJobAge), read as sacct's table."""

        def _make_command(self) -> list[str] | None:
            command = super()._make_command()
            if command is None:
                return None
            ids = ",".join(command[command.index("-j") + 1::2])
            return ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N", f"--jobs={ids}"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            return super().read_info("JobID|State|NodeList\n" + text)

    return SqueueWatcher(delay_s=delay_s)
