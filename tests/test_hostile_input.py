"""Hostile and broken input gets one line naming the file or key and what to do, never a traceback: one test per
class of input that used to end in a traceback (data files, keywords the schema does not check, code that cannot
be imported, damaged records, a read-only run folder, run-folder files that are not plain YAML)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CPU, read_summary
from datafiles import write_idx, write_image_folder, write_mnist


def one_line(ran, prog: str = "dlrun") -> str:
    assert ran.returncode == 1, (ran.returncode, ran.stderr[-3000:])
    lines = [line for line in ran.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "Traceback" not in ran.stderr, ran.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------ keywords and code


def test_an_optimizer_setting_torch_refuses_is_one_line(cli):
    """Each number is checked before the run (tests/test_config.py); a combination only torch knows to refuse
    (Nesterov needs momentum) is torch's reason in one line."""
    line = one_line(cli("dlrun", "optimizer=momentum", "optimizer.momentum=0", "optimizer.nesterov=true",
                        "trainer.epochs=1", *CPU))
    assert "optimizer: torch.optim.SGD refuses its settings (ValueError: Nesterov momentum requires" in line


def test_a_model_whose_module_does_not_exist_is_one_line(cli):
    line = one_line(cli("dlrun", "model=custom", "model._target_=no_such_pkg.Net", "trainer.epochs=1", *CPU))
    assert "_target_=no_such_pkg.Net cannot be used: Error locating target 'no_such_pkg.Net'" in line
    assert "No module named 'no_such_pkg'" in line


def test_a_trusted_class_that_is_gone_is_one_line(cli, tmp_path, monkeypatch):
    """A model=custom run opened with --trust after its module went away."""
    (tmp_path / "gone_net.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, in_shape, num_outputs):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, num_outputs)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1))\n")
    cli("dlrun", "model=custom", "model._target_=gone_net.Net", "trainer.epochs=1", "hydra.run.dir=run", *CPU,
        check=True)
    (tmp_path / "gone_net.py").unlink()
    monkeypatch.delitem(__import__("sys").modules, "gone_net", raising=False)
    line = one_line(cli("dlrun-predict", tmp_path / "run", "--evaluate", "--trust", "gone_net.Net"), "dlrun-predict")
    assert "_target_=gone_net.Net cannot be used" in line


# ------------------------------------------------------------------ data files


@pytest.fixture
def mnist_files(tmp_path) -> Path:
    root = tmp_path / "files"
    write_mnist(root, n_train=120, n_test=40)
    return root


def test_an_image_folder_with_a_file_that_is_not_an_image(cli, tmp_path):
    root = write_image_folder(tmp_path / "images", classes=2, per_class=8, size=8)
    (root / "class0" / "notes.png").write_text("not an image")
    line = one_line(cli("dlrun", "dataset=imagefolder", f"dataset.root={root}", f"dataset.cache_dir={tmp_path}",
                        "trainer.epochs=1", *CPU))
    assert f"{root / 'class0' / 'notes.png'}: not an image Pillow can read" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_a_streamed_image_that_is_not_an_image(tmp_path, workers):
    """Folders too large for memory are decoded batch by batch, in DataLoader workers where asked: a bad file
    met there is the same one line, not the worker's traceback."""
    from dlrun.data.datasets import ImageFiles
    from dlrun.data.pipeline import StreamSplit
    from dlrun.errors import ConfigError

    root = write_image_folder(tmp_path / "images", classes=2, per_class=4, size=8)
    bad = root / "class1" / "cut.png"
    bad.write_bytes((root / "class1").joinpath(sorted(os.listdir(root / "class1"))[0]).read_bytes()[:20])
    files = sorted(str(p) for p in root.rglob("*.png"))
    images = ImageFiles(files=files, labels=[0 if "class0" in f else 1 for f in files], size=(8, 8), channels=3)
    split = StreamSplit(images, torch.zeros(3, 1, 1), torch.ones(3, 1, 1), torch.device("cpu"), workers)
    with pytest.raises(ConfigError) as err:
        list(split.batches(4))
    assert str(err.value) == (f"{bad}: not an image Pillow can read (OSError); remove it from the image folder, "
                              "or convert it")


def test_idx_files_whose_image_and_label_counts_differ(cli, mnist_files):
    raw = mnist_files / "MNIST" / "raw"
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(100, dtype=np.uint8))  # 120 images, 100 labels
    line = one_line(cli("dlrun", "dataset=mnist", f"dataset.data_dir={mnist_files}", "trainer.epochs=1", *CPU))
    assert "the train files under" in line and "hold 120 images but 100 labels" in line


def test_labels_outside_the_classes(cli, mnist_files):
    write_idx(mnist_files / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.full(40, 12, dtype=np.uint8))
    line = one_line(cli("dlrun", "dataset=mnist", f"dataset.data_dir={mnist_files}", "trainer.epochs=1", *CPU))
    assert "the test split has labels 12..12, outside the 10 classes 0..9" in line


def test_data_too_small_for_a_split(cli, tmp_path):
    root = write_image_folder(tmp_path / "images", classes=2, per_class=2, size=8)  # 4 images: no val split left
    line = one_line(cli("dlrun", "dataset=imagefolder", f"dataset.root={root}", f"dataset.cache_dir={tmp_path}",
                        "trainer.epochs=1", *CPU))
    assert "split is empty (train " in line and "dataset.val_fraction / dataset.test_fraction" in line


def test_a_truncated_idx_file_is_named_with_its_size(cli, mnist_files):
    images = mnist_files / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    line = one_line(cli("dlrun", "dataset=mnist", f"dataset.data_dir={mnist_files}", "trainer.epochs=1", *CPU))
    assert "torchvision cannot read the files under" in line and "MNIST/raw/train-images-idx3-ubyte (1,000 bytes)" in line


# ------------------------------------------------------------------ damaged records


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", json.dumps({"best": [0.9], "status": "completed"})])
def test_a_report_on_a_damaged_summary(cli, trained, tmp_path, damage):
    run = shutil.copytree(trained("trainer.epochs=1", *CPU), tmp_path / "run")
    (run / "summary.json").write_text(damage)
    line = one_line(cli("dlrun-report", run), "dlrun-report")
    assert str(run / "summary.json") in line


def test_a_report_to_a_csv_that_cannot_be_written(cli, trained, tmp_path):
    run = trained("trainer.epochs=1", *CPU)
    line = one_line(cli("dlrun-report", run, "--csv", tmp_path / "no" / "such" / "runs.csv",
                        "--plots", tmp_path / "plots"), "dlrun-report")
    assert f"{tmp_path / 'no' / 'such' / 'runs.csv'}: cannot be written (No such file or directory)" in line


@pytest.mark.parametrize("record", ["overrides.yaml", "config.yaml"])
def test_run_folder_yaml_that_is_not_plain_is_read_never_evaluated(cli, tmp_path, record):
    """A python tag in Hydra's record of a run: a resume (overrides.yaml) and a distillation that names the run
    as its teacher (config.yaml) refuse it in one line, and nothing of it runs."""
    cli("dlrun", "hydra.run.dir=run", "trainer.epochs=1", *CPU, check=True)
    run = tmp_path / "run"
    sentinel = tmp_path / "pwned"
    (run / ".hydra" / record).write_text(f"- !!python/object/apply:os.system ['touch {sentinel}']\n")
    ran = cli("dlrun", f"resume={run}", "trainer.epochs=2") if record == "overrides.yaml" else \
        cli("dlrun", f"trainer.distill.teacher={run}", "trainer.epochs=1", "hydra.run.dir=student", *CPU)
    assert f"{run / '.hydra' / record} is not a plain YAML file" in one_line(ran)
    assert not sentinel.exists()


# ------------------------------------------------------------------ a read-only run folder


def read_only(folder: Path, monkeypatch) -> None:
    """The file system under `folder` refuses writes, as a read-only mount does (root passes every permission
    check here, and this sandbox cannot mount)."""
    real_open, real_mkdir, real_statvfs = os.open, os.mkdir, os.statvfs
    inside = str(folder.resolve())

    def refused(path) -> bool:
        return str(Path(path).resolve()).startswith(inside)

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if refused(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    def statvfs(path):
        result = real_statvfs(path)
        if not refused(path):
            return result
        return os.statvfs_result((*result[:8], result.f_flag | os.ST_RDONLY, *result[9:]))

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "statvfs", statvfs)


@pytest.mark.parametrize("command", ["resume", "report", "explain", "compress"])
def test_commands_on_a_read_only_run_folder(cli, trained, tmp_path, monkeypatch, command):
    run = shutil.copytree(trained("trainer.epochs=1", *CPU), tmp_path / "run")
    before = read_summary(run)
    read_only(run, monkeypatch)
    args = {"resume": ("dlrun", f"resume={run}", "trainer.epochs=2"), "report": ("dlrun-report", run),
            "explain": ("dlrun-explain", run, "--examples", "2"),
            "compress": ("dlrun-compress", run, "--no-onnx", "--quantize", "", "--no-half", "--prune", "")}[command]
    line = one_line(cli(*args), args[0])
    assert "read-only file" in line.lower(), line
    assert read_summary(run) == before
