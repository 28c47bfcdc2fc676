"""`hparams_search=<name>`: Hydra's Optuna sweeper, with a study that many workers share and a rerun continues.

The presets in conf/hparams_search/ select this sweeper (`hydra/sweeper: dlrun_optuna`, registered
below; the class is a Hydra plugin through the `hydra.plugins` entry point in pyproject.toml).
Hydra's sweeper asks Optuna for trials and launches them as jobs; this one keeps that (its search
space, samplers and launchers) and runs its own ask-launch-tell loop, because a study shared by
several worker processes needs what Hydra's loop cannot give:

- storage that several processes (and machines) can open: an SQLAlchemy URL (`sqlite:///...`, the
  default, in the sweep folder; `postgresql+psycopg://user@host/db` for workers on several machines)
  or Optuna's journal file on a shared file system (`journal:/path/study.log`); a bad URL or an
  unwritable folder is one line naming `hydra.sweeper.storage`;
- job folders named by the trial number Optuna hands out (`hydra.sweep.subdir=<number>`), so
  workers started together, or a rerun of the same command, never share a folder;
- `n_trials` counts this worker's trials; `max_trials` bounds the study's total (trials complete,
  pruned or running), so N workers stop together;
- heartbeats (RDB storages, `heartbeat_s`): a trial whose worker died is marked failed by the next
  worker that asks, and retried once with the same parameters (Optuna's RetryFailedTrialCallback);
- a seeded sampler is seeded with seed + trial number for each trial, so workers and reruns sample
  new points while one worker's sequence is still reproducible;
- the study remembers the command line's fixed overrides (`dlrun.fixed_overrides`), and a rerun with
  other ones (say `trainer.epochs=2` after 3) says so: its trials would not be comparable.

Imported by Hydra at every start, so it imports nothing heavy (optuna only inside methods).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import (
    OptunaSweeper as HydraOptunaSweeper,
)
from omegaconf import DictConfig, OmegaConf

from dlrun.errors import ConfigError, DlrunError

log = logging.getLogger(__name__)
SQLITE, JOURNAL = "sqlite:///", "journal:"
FIXED = "dlrun.fixed_overrides"  # the study's user attribute
SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")  # what a sampler config may name


@dataclass
class DlrunOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "dlrun.hydra_ext.search.OptunaSweeper"
    n_jobs: int = 1  # trials launched at once by this worker (in parallel with launcher=local_parallel)
    max_trials: int | None = None  # the study's total over all workers (null: no bound)
    heartbeat_s: int = 60  # RDB storages: a running trial's heartbeat; silent for 2x this, it is failed, retried
    max_retry: int = 1  # times a trial whose worker died is run again


ConfigStore.instance().store(group="hydra/sweeper", name="dlrun_optuna", node=DlrunOptunaSweeperConf,
                             provider="dlrun")


class OptunaSweeper(HydraOptunaSweeper):
    def __init__(self, *, max_trials: int | None, heartbeat_s: int, max_retry: int, **hydra_options: Any) -> None:
        super().__init__(**hydra_options)
        self.max_trials, self.heartbeat_s, self.max_retry = max_trials, heartbeat_s, max_retry
        self.sampler_config: DictConfig | None = None
        self.storage: Any = None  # the opened hydra.sweeper.storage

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        least = {"n_trials": 1, "n_jobs": 1, "max_trials": 1, "heartbeat_s": 1, "max_retry": 0}
        for key, value in config.hydra.sweeper.items():
            if key in least and value is not None and value < least[key]:
                raise SystemExit(f"dlrun: error: hydra.sweeper.{key}={value} must be at least {least[key]}")
        if isinstance(config.hydra.sweeper.sampler.get("seed"), int):
            self.sampler_config = config.hydra.sweeper.sampler

    def sweep(self, arguments: list[str]) -> None:
        """Ask the study for this worker's `n_trials` trials (`n_jobs` at a time), run each as a job in
        the folder named by its trial number, tell the study each result; stop early at `max_trials`."""
        import optuna

        impl = self.sweeper
        impl._process_searchspace_config()
        space, fixed_params, fixed_args = self.search_space(arguments)
        try:
            study = self.open_study(arguments)
        except DlrunError as err:
            raise SystemExit(f"dlrun: error: {err}") from None
        ran = 0
        while ran < impl.n_trials:
            batch = min(impl.n_jobs, impl.n_trials - ran, self.room(study))
            if batch <= 0:
                log.info(f"The study {study.study_name} holds max_trials={self.max_trials} trials: this worker "
                         f"stops after {ran}")
                break
            with quiet_optuna():  # heartbeats are kept by this loop (see heartbeats), not by Study.optimize
                optuna.storages.fail_stale_trials(study)  # trials of dead workers: failed, and queued again
                trials = [study.ask() for _ in range(batch)]
            overrides = [self.configure(trial, space, fixed_params, fixed_args) for trial in trials]
            with self.heartbeats(trials):
                try:
                    returns = impl.launcher.launch(overrides, initial_job_idx=trials[0].number)
                except BaseException:  # interrupted: the trials stop here, recorded as failed
                    for trial in trials:
                        study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
            for trial, ret in zip(trials, returns):
                values = trial_value(ret)
                study.tell(trial, values=values, state=None if values else optuna.trial.TrialState.FAIL)
            ran += batch
        self.write_best(study)

    def search_space(self, arguments: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """Hydra's: the distributions to sample, the fixed parameters, the other overrides; a grid sampler
        gets its grid (and bounds n_trials by the grid's size)."""
        import functools

        import optuna
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        impl = self.sweeper
        space, fixed_params, fixed_args = create_params_from_overrides(impl._parse_sweeper_params_config() + arguments)
        for name in fixed_params:
            space.pop(name, None)
        if isinstance(impl.sampler, functools.partial) and impl.sampler.func == optuna.samplers.GridSampler:
            grid = {name: impl._to_grid_sampler_choices(d) for name, d in space.items()}
            impl.sampler, self.sampler_config = impl.sampler(grid), None  # a grid is walked, not reseeded
            impl.n_trials = min(impl.n_trials, math.prod(len(v) for v in grid.values()))
        return space, fixed_params, fixed_args

    def open_study(self, arguments: list[str]) -> Any:
        """The study, created by the first worker (the others load it); one that remembers other fixed
        overrides than this command's is told so."""
        import optuna

        impl = self.sweeper
        self.storage = storage = open_storage(impl.storage, self.heartbeat_s, self.max_retry)
        study = retry_race(lambda: optuna.create_study(study_name=impl.study_name, storage=storage,
                                                       sampler=impl.sampler, load_if_exists=True,
                                                       directions=impl._get_directions()))
        fixed = fixed_overrides(arguments)
        earlier = study.user_attrs.get(FIXED)
        if earlier is None:  # a new study (or one from before dlrun kept them)
            study.set_user_attr(FIXED, fixed)
        elif earlier != fixed:
            print(f"dlrun: warning: the study {study.study_name} was run with the fixed overrides "
                  f"[{' '.join(earlier)}], this run gives [{' '.join(fixed)}]: its trials are not comparable with the "
                  "earlier ones (hydra.sweeper.study_name=<another name> starts a new study)", file=sys.stderr)
        log.info(f"Study {study.study_name} in {shown_storage(impl.storage)}: {len(study.trials)} trials so far")
        return study

    def room(self, study: Any) -> int:
        """How many more trials `max_trials` allows (the study's complete, pruned and running trials count)."""
        if self.max_trials is None:
            return sys.maxsize
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        return self.max_trials - len(study.get_trials(deepcopy=False, states=states))

    def configure(self, trial: Any, space: dict[str, Any], fixed_params: dict[str, Any],
                  fixed_args: list[str]) -> tuple[str, ...]:
        """The trial's overrides (Hydra's, sampled by the sampler seeded for this trial number), and its
        job folder: the trial number."""
        if self.sampler_config is not None:
            seed = self.sampler_config.seed + trial.number
            trial.study.sampler = instantiate(OmegaConf.merge(self.sampler_config, {"seed": seed}),
                                              _execution_whitelist_=SAMPLERS)
        (overrides,) = self.sweeper._configure_trials([trial], space, fixed_params, fixed_args)
        retried = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retried is not None:
            log.info(f"trial {trial.number} runs trial {retried} again (its worker stopped: no heartbeat for "
                     f"{2 * self.heartbeat_s} s)")
        return (*overrides, f"hydra.sweep.subdir={trial.number}")

    @contextmanager
    def heartbeats(self, trials: Sequence[Any]) -> Iterator[None]:
        """While the trials run, record their heartbeat every `heartbeat_s` (storages that keep one)."""
        from optuna.storages import RDBStorage  # the storage that keeps heartbeats

        storage = self.storage
        if not (isinstance(storage, RDBStorage) and storage.get_heartbeat_interval()):
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while True:
                for trial in trials:
                    storage.record_heartbeat(trial._trial_id)
                if stop.wait(self.heartbeat_s):
                    return

        thread = threading.Thread(target=beat, name="dlrun-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def write_best(self, study: Any) -> None:
        """Hydra's optimization_results.yaml in the sweep folder: the best trial so far (if any completed)."""
        from optuna.trial import TrialState

        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return
        best = study.best_trial
        log.info(f"Best parameters: {best.params}")
        log.info(f"Best value: {best.value} (trial {best.number})")
        path = Path(self.sweeper.config.hydra.sweep.dir) / "optimization_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value,
                                         "best_trial": best.number}), path)


def trial_value(ret: Any) -> list[float] | None:
    """A job's result as Optuna's values; None for a failed job (a run that failed returns NaN)."""
    try:
        value = float(ret.return_value)
    except Exception:  # noqa: BLE001 - the job raised: Hydra re-raises it here; its run folder says why
        return None
    return None if math.isnan(value) else [value]


def open_storage(spec: Any, heartbeat_s: int, max_retry: int) -> Any:
    """`hydra.sweeper.storage` opened: None (in memory), `journal:<path>` (Optuna's journal file), or an
    SQLAlchemy URL (with heartbeats; an SQLite file's folder is created first)."""
    if spec is None:
        return None
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    spec = str(spec)
    try:
        if spec.startswith(JOURNAL):
            path = Path(spec[len(JOURNAL):]).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if spec.startswith(SQLITE):
            Path(spec[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
        with quiet_optuna():
            return retry_race(lambda: RDBStorage(
                spec, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry)))
    except Exception as err:  # noqa: BLE001 - a driver's, SQLAlchemy's or the file system's error, as one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"hydra.sweeper.storage={shown_storage(spec)} cannot be opened: {reason} (an SQLAlchemy "
                          "URL such as sqlite:///path/study.db or postgresql+psycopg://user@host/db, or "
                          "journal:/path/study.log)") from None


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Without Optuna's warnings that its heartbeat API is experimental and meant for Study.optimize (dlrun keeps
    the heartbeats of its ask-and-tell loop itself)."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def retry_race(make: Any, tries: int = 5) -> Any:
    """`make()`, again after a short wait when another worker was creating the same tables or study at the
    same moment (SQLite: "table studies already exists"; PostgreSQL: a duplicate key)."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(tries):
        try:
            return make()
        except (IntegrityError, OperationalError, ProgrammingError) as err:
            if attempt == tries - 1 or not re.search(r"already exists|duplicate|locked", str(err), re.I):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def shown_storage(spec: Any) -> str:
    """The storage as it may be printed: a URL's password hidden."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", str(spec))


def fixed_overrides(arguments: list[str]) -> list[str]:
    """The command line's overrides that are not swept (`trainer.epochs=2`, not `trainer.seed=0,1`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(arguments)
    return sorted(o.input_line for o in parsed if not o.is_sweep_override() and o.input_line)
