"""Evaluating a checkpoint and predicting new inputs: image files and tensor files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import CPU, locked, read_summary
from datafiles import write_image_folder
from dlrun.checkpoint import load_model
from dlrun.data import load_digits
from dlrun.errors import ConfigError
from dlrun.tools.predict import predict, read_inputs


@pytest.fixture(scope="module")
def folder_run(shared_dir, trained):
    """A run on an image folder (3 classes of 16x16 PNGs), shared by the session, and the folder."""
    root = shared_dir / "predict_images"
    with locked(shared_dir / "predict_images.lock"):
        if not root.is_dir():
            part = write_image_folder(shared_dir / "predict_images.part", classes=3, per_class=30, size=16)
            part.rename(root)  # whole or not there: another worker waits for the lock, then finds it
    run_dir = trained("dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=[16,16]", "trainer.epochs=6",
                      *CPU)
    return run_dir, root


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


def test_tensor_file_in_the_datasets_raw_scale(trained, tmp_path):
    run_dir = trained("trainer.epochs=1", *CPU)
    x, y = load_digits(0.2, 0.1, 0).test  # raw pixel values 0..16, as the dataset gives them
    torch.save(torch.from_numpy(x), tmp_path / "inputs.pt")
    np.save(tmp_path / "inputs.npy", x)
    model, _, data = load_model(run_dir / "checkpoints" / "best.pt")
    for name in ("inputs.pt", "inputs.npy"):
        _, index = predict(model, read_inputs([tmp_path / name], data)[0], topk=1)
        accuracy = (index[:, 0].numpy() == y).mean()
        assert accuracy == pytest.approx(read_summary(run_dir)["best"]["test/acc"])  # the run's own evaluation
    torch.save(torch.from_numpy(x[0]), tmp_path / "one.pt")  # a single sample, without the batch axis
    one, sources = read_inputs([tmp_path / "one.pt"], data)
    assert one.shape == (1, 1, 8, 8) and sources == [str(tmp_path / "one.pt")]
    torch.save(torch.zeros(2, 3, 3), tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match=r"expected \(N, 1, 8, 8\)"):
        read_inputs([tmp_path / "wrong.pt"], data)


def test_mixed_image_and_tensor_files_keep_their_order(folder_run, cli, tmp_path):
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
    shutil.copy(images[0], tmp_path)  # both files by their names in the working directory: no row wraps
    out = cli("dlrun-predict", run_dir, "two.pt", images[0].name, "--topk", "1", cwd=tmp_path, check=True).stdout
    rows = [line for line in out.splitlines() if "two.pt" in line or images[0].name in line]
    assert [("two.pt [0]" in r, "two.pt [1]" in r, images[0].name in r) for r in rows] == \
        [(True, False, False), (False, True, False), (False, False, True)], out


def test_the_command(folder_run, cli):
    run_dir, root = folder_run
    image = sorted((root / "class1").glob("*.png"))[0]
    out = cli("dlrun-predict", run_dir, image, "--topk", "3", "--evaluate", check=True).stdout
    assert f"acc {read_summary(run_dir)['best']['test/acc']:.4f}" in out
    assert "class1" in out and "probability" in out
    bad = cli("dlrun-predict", run_dir, "missing.png")
    assert bad.returncode != 0 and "missing.png: no such file" in bad.stderr and "Traceback" not in bad.stderr
    folder = cli("dlrun-predict", run_dir, root / "class1")  # a folder of images is not taken for a missing file
    assert folder.returncode == 1 and f"{root / 'class1'}: a folder; give the image or tensor files" in folder.stderr


def test_flip_tta_averages_the_prediction_with_the_mirror_images(trained, cli, tmp_path):
    """--tta flip: each input's class probabilities are the mean of the model's on it and on its mirror image;
    --evaluate scores that mean on the test split."""
    run_dir = trained("trainer.epochs=1", *CPU)
    x, y = load_digits(0.2, 0.1, 0).test
    torch.save(torch.from_numpy(x[:5]), tmp_path / "inputs.pt")
    ran = cli("dlrun-predict", run_dir, "inputs.pt", "--topk", "1", "--tta", "flip", check=True)
    model, _, data = load_model(run_dir)
    inputs, _ = read_inputs([tmp_path / "inputs.pt"], data)
    with torch.no_grad():
        mean = (torch.softmax(model(inputs), 1) + torch.softmax(model(inputs.flip(-1)), 1)) / 2
    top = mean.max(1)
    for i, (p, k) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
        assert f"│ inputs.pt [{i}] │ 1    │ {k}     │      {p:.4f} │" in ran.stdout, ran.stdout
    ran = cli("dlrun-predict", run_dir, "--evaluate", "--tta", "flip", check=True)
    all_inputs = (torch.from_numpy(x) - torch.tensor(data["mean"]).view(1, -1, 1, 1)) / torch.tensor(data["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        mean = (torch.softmax(model(all_inputs), 1) + torch.softmax(model(all_inputs.flip(-1)), 1)) / 2
    acc = (mean.argmax(1).numpy() == y).mean()
    loss = torch.nn.functional.nll_loss(mean.log(), torch.from_numpy(y)).item()
    assert f"test split of digits (test-time augmentation: flip): loss {loss:.4f}  acc {acc:.4f}" in ran.stdout


def test_flip_tta_is_refused_for_signals(trained, cli):
    run_dir = trained("dataset=mnist1d", "dataset.num_samples=600", "model=cnn", "trainer.epochs=2", *CPU)
    ran = cli("dlrun-predict", run_dir, "--evaluate", "--tta", "flip")
    assert ran.returncode == 1 and ran.stderr.strip() == (
        "dlrun-predict: error: --tta flip mirrors images left to right; this model takes (1, 40) inputs (signals or "
        "sequences), which a mirror image would change in meaning")
