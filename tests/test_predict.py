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
    x, sources = read_inputs(files, data)
    assert sources == [str(f) for f in files]
    probs, index = predict(model, x, topk=2)
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
        _, index = predict(model, read_inputs([tmp_path / name], data)[0], topk=1)
        accuracy = (index[:, 0].numpy() == y).mean()
        assert accuracy == pytest.approx(summary["best"]["test/acc"])  # the same as the run's own evaluation
    torch.save(torch.from_numpy(x[0]), tmp_path / "one.pt")  # a single sample, without the batch axis
    one, sources = read_inputs([tmp_path / "one.pt"], data)
    assert one.shape == (1, 1, 8, 8) and sources == [str(tmp_path / "one.pt")]
    torch.save(torch.zeros(2, 3, 3), tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match=r"expected \(N, 1, 8, 8\)"):
        read_inputs([tmp_path / "wrong.pt"], data)


def test_mixed_image_and_tensor_files_keep_their_order(folder_run, tmp_path):
    """Each row is named by the file it came from, in the order given (a tensor file's samples by index)."""
    run_dir, root = folder_run
    model, _, data = load_model(run_dir)
    images = sorted(root.glob("class*/*.png"))[:2]
    x_images, _ = read_inputs(images, data)
    std, mean = (torch.tensor(data[k]).view(1, -1, 1, 1) for k in ("std", "mean"))
    torch.save(x_images.flip(0) * std + mean, tmp_path / "two.pt")  # the two images again, raw scale, reversed
    x, sources = read_inputs([images[0], tmp_path / "two.pt", images[1]], data)
    assert sources == [str(images[0]), f"{tmp_path / 'two.pt'} [0]", f"{tmp_path / 'two.pt'} [1]", str(images[1])]
    assert torch.allclose(x[0], x_images[0]) and torch.allclose(x[1], x_images[1], atol=1e-5)
    assert torch.allclose(x[2], x_images[0], atol=1e-5) and torch.allclose(x[3], x_images[1])
    out = subprocess.run([DLRUN_PREDICT, str(run_dir), str(tmp_path / "two.pt"), str(images[0]), "--topk", "1"],
                         capture_output=True, text=True, check=True, env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"}).stdout
    rows = [line for line in out.splitlines() if "two.pt" in line or images[0].name in line]
    assert [("two.pt [0]" in r, "two.pt [1]" in r, images[0].name in r) for r in rows] == \
        [(True, False, False), (False, True, False), (False, False, True)], out


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
