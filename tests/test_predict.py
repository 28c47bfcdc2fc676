"""Evaluating a checkpoint and predicting new inputs: image files and tensor files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_summary
from datafiles import write_image_folder
from dlrun.errors import ConfigError
from dlrun.data import load_digits
from dlrun.tools.predict import load_model, predict, read_inputs
from dlrun.run import run

DLRUN_PREDICT = str(Path(sys.executable).with_name("dlrun-predict"))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from dlrun.cli import config_dir
    from dlrun.config.schema import register_configs

    base = tmp_path_factory.mktemp("predict")
    root = write_image_folder(base / "images", classes=3, per_class=30, size=16)
    register_configs()
    with initialize_config_dir(config_dir=config_dir()):
        cfg = compose("config", overrides=["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=[16,16]",
                                           f"dataset.cache_dir={base / 'cache'}", "trainer.epochs=6", "device=cpu"])
    run(cfg, run_dir=base / "run")
    return base / "run", root


def test_top_k_for_image_files(folder_run):
    run_dir, root = folder_run
    model, _, data = load_model(run_dir)
    assert data["classes"] == ["class0", "class1", "class2"]
    files = sorted(root.glob("class*/*.png"))
    probs, index = predict(model, read_inputs(files, data), topk=2)
    assert probs.shape == (len(files), 2) and (probs[:, 0] >= probs[:, 1]).all() and (probs.sum(1) <= 1 + 1e-6).all()
    truth = torch.tensor([data["classes"].index(f.parent.name) for f in files])
    assert (index[:, 0] == truth).float().mean() > 0.9


def test_tensor_file_in_the_datasets_raw_scale(tmp_path):
    from hydra import compose, initialize_config_dir

    from dlrun.cli import config_dir

    with initialize_config_dir(config_dir=config_dir()):
        cfg = compose("config", overrides=["trainer.epochs=4", "device=cpu"])
    summary = run(cfg, run_dir=tmp_path / "run")
    x, y = load_digits(0.2, 0.1, 0).test  # raw pixel values 0..16, as the dataset gives them
    torch.save(torch.from_numpy(x), tmp_path / "inputs.pt")
    np.save(tmp_path / "inputs.npy", x)
    model, _, data = load_model(tmp_path / "run" / "checkpoints" / "best.pt")
    for name in ("inputs.pt", "inputs.npy"):
        _, index = predict(model, read_inputs([tmp_path / name], data), topk=1)
        accuracy = (index[:, 0].numpy() == y).mean()
        assert accuracy == pytest.approx(summary["best"]["test/acc"])  # the same as the run's own evaluation
    torch.save(torch.from_numpy(x[0]), tmp_path / "one.pt")  # a single sample, without the batch axis
    assert read_inputs([tmp_path / "one.pt"], data).shape == (1, 1, 8, 8)
    torch.save(torch.zeros(2, 3, 3), tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match=r"expected \(N, 1, 8, 8\)"):
        read_inputs([tmp_path / "wrong.pt"], data)


@pytest.mark.slow
def test_the_command(folder_run):
    run_dir, root = folder_run
    image = sorted((root / "class1").glob("*.png"))[0]
    out = subprocess.run([DLRUN_PREDICT, str(run_dir), str(image), "--topk", "3", "--evaluate"],
                         capture_output=True, text=True, check=True, env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"}).stdout
    assert f"acc {read_summary(run_dir)['best']['test/acc']:.4f}" in out
    assert "class1" in out and "probability" in out
    bad = subprocess.run([DLRUN_PREDICT, str(run_dir), "missing.png"], capture_output=True, text=True)
    assert bad.returncode != 0 and "missing.png: no such file" in bad.stderr and "Traceback" not in bad.stderr
