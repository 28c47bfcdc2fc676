"""Every preset of conf/experiment/ runs: one step with its own model, optimizer and scheduler, on small data
in the real format of its dataset (MNIST IDX files, CIFAR pickles written here; MNIST-1D and the sequences
generated), so that a preset that cannot run fails here and not in a user's hands."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CPU, compose_config
from datafiles import write_cifar, write_mnist
from dlrun.config.schema import conf_dir
from dlrun.cost import count_parameters
from dlrun.models import build_model
from dlrun.run import run

PRESETS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
FILES = {"dlrun.data.load_mnist", "dlrun.data.load_fashion_mnist", "dlrun.data.load_cifar10", "dlrun.data.load_cifar100"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Small datasets in torchvision's formats (MNIST's IDX files, CIFAR-10's pickles)."""
    root = tmp_path_factory.mktemp("files")
    write_mnist(root, n_train=200, n_test=64)
    write_cifar(root, classes=10, per_batch=40, n_test=64)
    return root


def test_every_preset_is_tested():
    assert {"mnist_cnn", "mnist_keras_cnn", "cifar10_cnn", "mnist1d_cnn_tuned", "sequence_lstm"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_a_step(preset, files, tmp_path):
    overrides = [f"experiment={preset}", "debug=fast_dev_run", *CPU]
    if compose_config(*overrides).dataset._target_ in FILES:
        overrides += [f"dataset.data_dir={files}", "dataset.verify=false" if "cifar" in preset else "dataset.download=false"]
    cfg = compose_config(*overrides)
    summary = run(cfg, run_dir=tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 1, summary.get("error")
    assert summary["model"]["parameters"] == count_parameters(
        build_model(cfg.model, summary["data"]["input_shape"], summary["data"]["num_outputs"]))
