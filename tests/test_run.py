"""`run(cfg)` in-process and the task function that sweepers call."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import CPU, read_summary
from dlrun.cli import _app
from dlrun.config.schema import cpu_share
from dlrun.errors import ConfigError, RunFolderError
from dlrun.run import run


@pytest.fixture
def hydra_cfg(make_cfg, tmp_path):
    """A config composed with its `hydra` node, installed as Hydra does for a job."""

    def _make(*overrides):
        from hydra import compose, initialize_config_dir

        from dlrun.cli import config_dir

        with initialize_config_dir(config_dir=config_dir()):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "job")
            cfg.hydra.runtime.choices = {}
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield _make
    HydraConfig.instance().cfg = None


def test_task_function_returns_the_monitored_metric(hydra_cfg, tmp_path):
    cfg = hydra_cfg("trainer.epochs=2", "trainer.monitor=val/loss", "device=cpu")
    value = _app.__wrapped__(cfg)
    summary = read_summary(tmp_path / "job")
    assert isinstance(value, float) and value == summary["monitor_value"] == summary["best"]["val/loss"]
    assert summary["monitor"] == {"metric": "val/loss", "mode": "min"}


def test_run_reports_final_and_best(make_cfg, tmp_path):
    summary = run(make_cfg("trainer.epochs=3", *CPU), run_dir=tmp_path)
    assert summary["status"] == "completed" and summary["epochs"] == 3 and summary["steps"] == 60
    assert {"train/loss", "val/acc", "test/acc"} <= summary["final"].keys()
    assert 1 <= summary["best"]["epoch"] <= 3 and "test/acc" in summary["best"]
    assert summary == read_summary(tmp_path)
    assert not (tmp_path / "plots").exists()  # a run's pictures are drawn with logger.plots=true only


def test_logger_plots_draws_the_runs_pictures(make_cfg, tmp_path):
    from PIL import Image

    run(make_cfg("trainer.epochs=2", "logger.plots=true", *CPU), run_dir=tmp_path)
    with Image.open(tmp_path / "plots" / "learning_curves.png") as png:  # a real image: loss and accuracy panels
        assert png.format == "PNG" and png.width > 2 * png.height
    with Image.open(tmp_path / "plots" / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.width > 300


def test_a_new_run_never_starts_in_a_folder_that_holds_another_run(make_cfg, tmp_path):
    run(make_cfg("trainer.epochs=2", "device=cpu"), run_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(RunFolderError, match="holds another run"):
        run(make_cfg("trainer.epochs=1", "device=cpu"), run_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_local_parallel_gives_each_job_its_share_of_threads(hydra_cfg):
    cfg = hydra_cfg("launcher=local_parallel", "hydra.launcher.n_jobs=2")
    assert cfg.device.threads == cpu_share(2) == max(1, (os.cpu_count() or 1) // 2)
    assert cpu_share(-1) == 1 and cpu_share(1) == (os.cpu_count() or 1)


def test_failed_run_records_status_and_error(make_cfg, tmp_path):
    with pytest.raises(ConfigError):
        run(make_cfg("model.channels=[4,4,4,4]", "device=cpu"), run_dir=tmp_path)  # pools 8x8 below 1 pixel
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and "model.channels" in summary["error"]
    # it trained nothing: the corrected command may start again in the same folder
    assert run(make_cfg("trainer.epochs=1", "device=cpu"), run_dir=tmp_path)["status"] == "completed"


@pytest.mark.parametrize("overrides, best_epoch", [
    ([], 3),  # val/acc best at the last epoch: the best weights are the final ones
    (["trainer.monitor=train/loss", "trainer.monitor_mode=max"], 1),  # best at epoch 1
])
def test_the_best_and_the_final_weights_are_scored_on_the_test_split(make_cfg, tmp_path, overrides, best_epoch):
    """The summary's test scores are those of the weights in best.pt and last.pt, each evaluated afresh."""
    from dlrun.checkpoint import load_model
    from dlrun.data import build_dataset
    from dlrun.train import evaluate

    cfg = make_cfg("trainer.epochs=3", "optimizer.lr=0.003", "trainer.channels_last=false", *CPU, *overrides)
    summary = run(cfg, run_dir=tmp_path)
    assert summary["best"]["epoch"] == best_epoch
    assert 0 < summary["after_training_s"] < summary["wall_time_s"]
    test = build_dataset(cfg.dataset, torch.device("cpu")).splits["test"]
    for which, name in (("best", "best.pt"), ("final", "last.pt")):
        scores = evaluate(load_model(tmp_path / "checkpoints" / name)[0], test, cfg.trainer.eval_batch_size)
        assert scores == {"loss": summary[which]["test/loss"], "acc": summary[which]["test/acc"]}, which
    same = {k: summary["best"][k] == summary["final"][k] for k in summary["final"] if k.startswith("test/")}
    assert all(same.values()) == (best_epoch == 3), same
