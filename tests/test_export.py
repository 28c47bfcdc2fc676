"""dlrun-export: a run's model as an ONNX, TorchScript or torch.export file that runs without dlrun, checked
against PyTorch on the test split; here each file is also run by its own runtime, independently of dlrun."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import CPU
from dlrun.checkpoint import load_model
from dlrun.data import build_dataset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # run_file's

DIGITS_CNN = ("trainer.epochs=1", *CPU)
M1D_GRU = ("experiment=mnist1d_gru", "trainer.epochs=1", "trainer.batch_size=128", "dataset.num_samples=600", *CPU)
SEQUENCE = ("dataset=sequence", "model=mlp", "trainer.epochs=1", *CPU)
TRANSFORMER = ("model=transformer", "model.layers=1", "trainer.epochs=1", *CPU)


def run_file(path, fmt: str, x: torch.Tensor) -> np.ndarray:
    """The exported file run by its own runtime, as a user outside dlrun would."""
    if fmt == "onnx":
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
        return module(x).numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
@pytest.mark.parametrize("run", [DIGITS_CNN, M1D_GRU, SEQUENCE, TRANSFORMER], ids=["cnn", "gru", "mlp-regression",
                                                                                  "transformer"])
def test_the_exported_model_computes_what_pytorch_computes_on_the_test_split(cli, trained, tmp_path, fmt, run):
    folder = trained(*run)
    out = tmp_path / f"model.{fmt}"
    ran = cli("dlrun-export", folder, "--format", fmt, "--out", out, check=True)
    model, cfg, data = load_model(folder)
    test = build_dataset(cfg.dataset, torch.device("cpu")).splits["test"]
    x = torch.cat([x for x, _ in test.batches(1000)])
    with torch.no_grad():
        expected = model(x).numpy()
    for batch in (x, x[:1], x[:7]):  # the batch size is free
        np.testing.assert_allclose(run_file(out, fmt, batch), expected[:len(batch)], rtol=1e-4, atol=1e-5)
    record = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert record["input"] == {"name": "x", "shape": ["N", *data["input_shape"]], "dtype": "float32"}
    assert record["normalise"] == {"mean": data["mean"], "std": data["std"]} and record["task"] == data["task"]
    assert record["check"]["samples"] == len(x) and record["check"]["max_abs_diff"] < 1e-4 * max(1, abs(expected).max())
    if data["task"] == "classification":
        assert record["check"]["same_predictions"] == 1.0 and record["classes"] == data.get("classes")
    assert ran.stdout.splitlines()[0].startswith(f"wrote {out} ({fmt}, best checkpoint, input (N, ")


def test_it_writes_into_the_run_folder_by_default_and_exports_the_last_checkpoint(cli, trained, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(trained(*DIGITS_CNN), folder)
    cli("dlrun-export", folder, "--format", "pt2", "--checkpoint", "last", check=True)
    written = folder / "export" / "model.pt2"
    model, _, data = load_model(folder / "checkpoints" / "last.pt")
    x = torch.randn(5, *data["input_shape"])
    with torch.no_grad():
        np.testing.assert_allclose(run_file(written, "pt2", x), model(x).numpy(), rtol=1e-4, atol=1e-5)
    assert json.loads((folder / "export" / "model.pt2.json").read_text())["checkpoint"] == "last"


@pytest.mark.parametrize("args, said", [
    (["missing"], "missing: not a run folder"),
    (["empty"], "empty: no checkpoint to export (checkpoints/best.pt does not exist"),
    (["empty", "--format", "tflite"], "argument --format: invalid choice: 'tflite' (choose from 'onnx', 'torchscript', 'pt2')"),
])
def test_bad_input_is_one_line(cli, tmp_path, args, said):
    (tmp_path / "empty").mkdir()
    ran = cli("dlrun-export", *args)
    assert ran.returncode != 0 and said in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr and not (tmp_path / "empty" / "export").exists()
