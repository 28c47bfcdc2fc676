"""`resume=<run folder>`: what a resumed run continues from, and with which config.

The rules: only the run's own checkpoint (`rundir.check_belongs`), the config saved in it (checked: it
names only dlrun's builders or what the command line names, see config/targets.py), and no override but
`trainer.epochs=N` (and the run's own overrides, which a requeued sweep job repeats).
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dlrun import checkpoint, rundir
from dlrun.errors import ConfigError
from dlrun.rundir import RunDir


def earlier_start(folder: RunDir) -> tuple[bool, str | None]:
    """A sweep job in a folder an earlier start of its sweep used (the sweep started again with hydra.sweep.dir=
    <the same>, or the job requeued by Slurm): (whether that start completed the job, which is then kept as it
    is; the folder to continue from, when it began and was cut off). Single runs: callbacks.continue_restarted."""
    job = HydraConfig.get().job.num
    earlier = rundir.earlier_sweep_job(folder, list(HydraConfig.get().overrides.task))
    if earlier == "completed":
        print(f"dlrun: job {job}: completed in an earlier start of this sweep, kept as it is ({folder.path})",
              file=sys.stderr)
        return True, None
    if earlier == "cut off":
        print(f"dlrun: job {job}: continuing its earlier start from {folder.last}", file=sys.stderr)
        return False, str(folder.path)
    return False, None


def continue_run(resume: str, folder: RunDir, given: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """The config to go on with and the last checkpoint to go on from."""
    ckpt = open_checkpoint(resume, folder)
    return resumed_config(ckpt, folder, resume, given), ckpt


def open_checkpoint(resume: str, folder: RunDir) -> dict[str, Any]:
    """The last checkpoint of the run to continue, refused (before anything is written) if it or the best one
    is not that run's own. Besides
    `resume=`, only the run's own overrides may be given (a requeued sweep job repeats them,
    see hydra_ext/launchers.py)."""
    last = rundir.resume_checkpoint(resume)
    if HydraConfig.initialized():
        saved = rundir.read_yaml(folder.hydra_overrides) if folder.hydra_overrides.is_file() else []
        own = {str(o) for o in saved} if isinstance(saved, list) else set()
        others = [o for o in HydraConfig.get().overrides.task
                  if not o.startswith(("resume=", "trainer.epochs=")) and o not in own]
        if others:
            raise ConfigError(
                f"resume={resume} continues the run with the config saved in its checkpoint; drop the other "
                f"overrides ({' '.join(others)}); to train for more epochs add trainer.epochs=N, to change "
                "anything else start a new run"
            )
    ckpt = checkpoint.load(last)
    rundir.check_belongs(folder, ckpt, last)
    if folder.best.is_file():  # refused now, a foreign best.pt would fail the run after its summary was rewritten
        rundir.check_belongs(folder, checkpoint.load(folder.best), folder.best)
    rundir.read_metrics(folder)  # a damaged record is refused before anything is written
    return ckpt


def resumed_config(resumed: dict[str, Any], folder: RunDir, resume: str, given: DictConfig) -> DictConfig:
    """The config saved in the checkpoint (with the settings added since it was saved: see
    checkpoint.config_of), trained on to `trainer.epochs=N` when the resume command says so."""
    cfg = checkpoint.config_of(resumed, folder.last, trusted_targets(),
                               consent=f"dlrun resume={resume} {{group}}._target_={{target}}")
    if not (HydraConfig.initialized() and any(o.startswith("trainer.epochs=") for o in HydraConfig.get().overrides.task)):
        return cfg
    epochs, done = given.trainer.epochs, resumed["state"]["epoch"]
    if epochs < max(done, 1):
        raise ConfigError(f"trainer.epochs={epochs} is invalid with resume=: the run has completed {done} epochs")
    if epochs != cfg.trainer.epochs and cfg.scheduler._target_ == "dlrun.optim.onecycle_lr":
        raise ConfigError(f"trainer.epochs={epochs} is invalid with resume=: scheduler=onecycle planned its cycle "
                          f"for {cfg.trainer.epochs} epochs; start a new run to train longer")
    cfg.trainer.epochs = epochs
    return cfg


def trusted_targets() -> list[str]:
    """The `_target_`s given on this command line: the user's consent to run that code when a
    saved config names it (a `model=custom` run resumed, or a requeued sweep job)."""
    if not HydraConfig.initialized():
        return []
    return [o.split("=", 1)[1] for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].endswith("._target_")]


def resume_point(resumed: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where a resumed run continues (epoch, batch, step), for its summary."""
    return None if resumed is None else {k: resumed["state"][k] for k in ("epoch", "batch", "step")}
