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

import shutil
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
        """Hydra's Slurm launch, with one-line errors where Slurm is missing or refuses the jobs."""
        from submitit.core.utils import FailedJobError

        if shutil.which("sbatch") is None:
            raise SystemExit("dlrun: error: launcher=slurm submits with Slurm's sbatch, which is not on PATH "
                             "here; launcher=submitit_local runs the same jobs on this machine")
        try:
            return super().launch(job_overrides, initial_job_idx)
        except FailedJobError as err:
            raise SystemExit(f"dlrun: error: Slurm did not take the jobs: {str(err).strip()}") from None
