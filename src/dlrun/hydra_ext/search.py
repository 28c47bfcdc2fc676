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
  repeating the first run's random start-up trials (and the same command is still reproducible);
- the study remembers the command line's fixed overrides (`dlrun.fixed_overrides`), and a rerun with
  other ones (say `trainer.epochs=2` after 3) says so: its trials would not be comparable.

Imported by Hydra at every start, so it imports nothing heavy (optuna only inside `setup`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import (
    OptunaSweeper as HydraOptunaSweeper,
)
from omegaconf import DictConfig, OmegaConf

SQLITE = "sqlite:///"
FIXED = "dlrun.fixed_overrides"  # the study's user attribute


class OptunaSweeper(HydraOptunaSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        storage, name = self.sweeper.storage, self.sweeper.study_name
        if isinstance(storage, str) and storage.startswith(SQLITE):
            Path(storage[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
        study = stored_study(storage, name)
        done = len(study.trials) if study is not None else 0
        self.sweeper.job_idx = done
        sampler = config.hydra.sweeper.sampler
        if done and isinstance(sampler.get("seed"), int):
            self.sweeper.sampler = instantiate(
                OmegaConf.merge(sampler, {"seed": sampler.seed + done}),
                _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*"),
            )

    def sweep(self, arguments: list[str]) -> None:
        """Hydra's Optuna sweep; the study keeps the fixed overrides it was started with, and a rerun with others
        is told that its trials will not be comparable with the earlier ones."""
        fixed = fixed_overrides(arguments)
        study = stored_study(self.sweeper.storage, self.sweeper.study_name)
        earlier = study.user_attrs.get(FIXED) if study is not None else None
        if earlier is not None and earlier != fixed:
            print(f"dlrun: warning: the study {self.sweeper.study_name} was run with the fixed overrides "
                  f"[{' '.join(earlier)}], this run gives [{' '.join(fixed)}]: its trials are not comparable with the "
                  "earlier ones (hydra.sweeper.study_name=<another name> starts a new study)", file=sys.stderr)
        super().sweep(arguments)
        study = stored_study(self.sweeper.storage, self.sweeper.study_name)
        if earlier is None and study is not None:  # a new study (or one from before dlrun kept them)
            study.set_user_attr(FIXED, fixed)


def stored_study(storage: Any, study_name: str | None) -> Any:
    """The stored Optuna study (None: a new study, or one kept only in memory)."""
    if storage is None or study_name is None:
        return None
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet
        return None


def fixed_overrides(arguments: list[str]) -> list[str]:
    """The command line's overrides that are not swept (`trainer.epochs=2`, not `trainer.seed=0,1`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(arguments)
    return sorted(o.input_line for o in parsed if not o.is_sweep_override() and o.input_line)
