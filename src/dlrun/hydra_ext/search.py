"""`hparams_search=<name>`: Hydra's Optuna sweeper, with a study that running the same command continues.

The presets in conf/hparams_search/ select Hydra's Optuna sweeper with this subclass as its
`_target_` (registered as a Hydra plugin through the `hydra.plugins` entry point in
pyproject.toml). It changes three things:

- the SQLite file's folder is created before Optuna opens it (the study lives inside the sweep
  folder, which Hydra would create only when the first job starts);
- job folders are numbered by Optuna trial number: a study that already has N trials starts
  this sweep's jobs at N, so a rerun adds folders after the earlier ones instead of writing
  over job 0, 1, ... (Hydra's sweeper counts from 0 in every process);
- a seeded sampler is seeded with seed + N, so a rerun samples new points rather than
  repeating the first run's random start-up trials (and the same command is still reproducible).

Imported by Hydra at every start, so it imports nothing heavy (optuna only inside `setup`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import (
    OptunaSweeper as HydraOptunaSweeper,
)
from omegaconf import DictConfig, OmegaConf

SQLITE = "sqlite:///"


class OptunaSweeper(HydraOptunaSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        storage, name = self.sweeper.storage, self.sweeper.study_name
        if isinstance(storage, str) and storage.startswith(SQLITE):
            Path(storage[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
        done = trials_so_far(storage, name)
        self.sweeper.job_idx = done
        sampler = config.hydra.sweeper.sampler
        if done and isinstance(sampler.get("seed"), int):
            self.sweeper.sampler = instantiate(
                OmegaConf.merge(sampler, {"seed": sampler.seed + done}),
                _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*"),
            )


def trials_so_far(storage: Any, study_name: str | None) -> int:
    """How many trials the stored study has (0 for a new study or one kept only in memory)."""
    if storage is None or study_name is None:
        return 0
    import optuna

    try:
        return len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # no such study yet
        return 0
