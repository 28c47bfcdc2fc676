"""hparams_search: Hydra's real Optuna sweeper with a SQLite study that a rerun continues (its trials run
one after another in this process: no process is started)."""

from __future__ import annotations

import json

import optuna
import pytest
from conftest import CPU, read_summary

from dlrun.config.validate import check_search_direction
from dlrun.errors import ConfigError


def study_trials(sweep) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="digits_cnn", storage=f"sqlite:///{sweep / 'optuna.db'}")
    return study.trials


def test_optuna_search_run_twice_continues_its_sqlite_study(cli, tmp_path):
    args = ("-m", "hparams_search=digits_cnn", "hydra.sweeper.n_trials=2", "trainer.epochs=1", *CPU)
    sweep = tmp_path / "outputs" / "search" / "digits_cnn"
    first = cli("dlrun", *args)
    assert first.returncode == 0, first.stderr
    assert [t.number for t in study_trials(sweep)] == [0, 1]

    second = cli("dlrun", *args)
    assert second.returncode == 0, second.stderr
    trials = study_trials(sweep)
    assert [(t.number, t.state.name) for t in trials] == [(i, "COMPLETE") for i in range(4)]
    # The rerun sampled new points (the sampler is seeded with seed + trial number).
    assert trials[2].params != trials[0].params and trials[3].params != trials[1].params
    # Job folder N is trial N: its overrides are the trial's parameters, its result the trial's value.
    for trial in trials:
        summary = read_summary(sweep / str(trial.number))
        assert summary["monitor_value"] == pytest.approx(trial.value)
        assert f"trainer.batch_size={trial.params['trainer.batch_size']}" in summary["overrides"]
        assert summary["choices"]["hparams_search"] == "digits_cnn"
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert [j["job"] for j in jobs] == ["0", "1", "2", "3"]
    best = max(trials, key=lambda t: t.value)
    assert f"Best value: {best.value}" in second.stdout + second.stderr


@pytest.mark.parametrize("key,value,least", [("n_trials", 0, 1), ("n_jobs", 0, 1), ("max_trials", 0, 1),
                                             ("heartbeat_s", 0, 1), ("max_retry", -1, 0)])
def test_sweeper_numbers_below_their_least_are_one_line(cli, tmp_path, key, value, least):
    ran = cli("dlrun", "-m", "hparams_search=digits_cnn", f"hydra.sweeper.{key}={value}", *CPU)
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines() == [f"dlrun: error: hydra.sweeper.{key}={value} must be at least {least}"]
    assert not (tmp_path / "outputs").exists()


def test_search_direction_must_match_the_monitor():
    check_search_direction("maximize", "val/acc", "max")
    check_search_direction("minimize", "val/loss", "min")
    check_search_direction(["maximize"], "val/acc", "max")  # multi-objective lists are left to the user
    with pytest.raises(ConfigError, match="set hydra.sweeper.direction=minimize"):
        check_search_direction("maximize", "val/loss", "min")


@pytest.mark.parametrize("preset,direction", [("digits_cnn", "maximize"), ("sequence_rnn", "minimize")])
def test_search_presets_keep_the_study_in_the_sweep_folder(preset, direction):
    from hydra import compose, initialize_config_dir

    from dlrun.cli import config_dir

    with initialize_config_dir(config_dir=config_dir()):
        cfg = compose(config_name="config", overrides=[f"hparams_search={preset}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "dlrun.hydra_ext.search.OptunaSweeper" and sweeper.direction == direction
    assert cfg.hydra.sweep.dir == f"outputs/search/{preset}"
    assert sweeper.storage == f"sqlite:///outputs/search/{preset}/optuna.db"
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "trainer.batch_size",
                                   "model.channels" if preset == "digits_cnn" else "model.hidden_size"}


def test_a_rerun_with_other_fixed_overrides_is_told_its_trials_do_not_compare(cli, tmp_path):
    """The study remembers the fixed overrides it was run with: `trainer.epochs=2` after `trainer.epochs=1`
    says so (the earlier trials trained half as long); the same ones again say nothing."""
    args = ("-m", "hparams_search=digits_cnn", "hydra.sweeper.n_trials=1", *CPU)
    assert cli("dlrun", *args, "trainer.epochs=1").returncode == 0
    same = cli("dlrun", *args, "trainer.epochs=1")
    assert same.returncode == 0 and "not comparable" not in same.stderr
    other = cli("dlrun", *args, "trainer.epochs=2")
    assert other.returncode == 0
    assert ("the study digits_cnn was run with the fixed overrides [device.threads=1 device=cpu "
            "hparams_search=digits_cnn trainer.epochs=1], this run gives [device.threads=1 device=cpu "
            "hparams_search=digits_cnn trainer.epochs=2]: its trials are not comparable") in other.stderr

