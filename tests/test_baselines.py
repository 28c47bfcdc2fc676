"""Regression baselines (repeat the last value; least-squares linear autoregression) on the model's test split."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from conftest import CPU, read_summary
from dlrun import baselines
from dlrun.data import RawSplits, build_data, load_digits, load_sequence
from dlrun.sinks import summary_table


def hand_made() -> RawSplits:
    """Windows of 3 values predicting the next 2, in their own units (the loader's layout: x (N, 1, L), y (N, K))."""
    train_x = np.array([[1, 2, 3], [2, 4, 6], [0, 1, 0], [5, 5, 5], [3, 1, 2]], dtype=np.float32)[:, None]
    # targets exactly linear in the window: y0 = x2 + (x2 - x1) + 1, y1 = 2 * x2 - x0
    train_y = np.stack([2 * train_x[:, 0, 2] - train_x[:, 0, 1] + 1, 2 * train_x[:, 0, 2] - train_x[:, 0, 0]], 1)
    test_x = np.array([[1, 1, 2], [4, 3, 1]], dtype=np.float32)[:, None]
    test_y = np.array([[2, 5], [1, 1]], dtype=np.float32)
    return RawSplits("hand", (train_x, train_y), (train_x, train_y), (test_x, test_y), num_outputs=2,
                     task="regression")


def test_naive_and_linear_baselines_against_hand_computed_values():
    found = baselines.baselines(build_data(hand_made(), torch.device("cpu")))
    # naive predicts [2, 2] and [1, 1]: errors [0, -3] and [0, 0]
    assert found["naive"]["mae"] == pytest.approx(3 / 4) and found["naive"]["mse"] == pytest.approx(9 / 4)
    # the linear fit is exact on the training windows: [1, 1, 2] -> [4, 3] and [4, 3, 1] -> [0, -2];
    # errors [2, -2] and [-1, -3]
    assert found["linear"]["mae"] == pytest.approx(8 / 4, abs=1e-5)
    assert found["linear"]["mse"] == pytest.approx(18 / 4, abs=1e-4)


def test_normalising_leaves_the_loaders_arrays_alone_even_when_splits_share_them():
    raw = hand_made()  # val is the training split's own arrays
    before = raw.train[0].copy()
    data = build_data(raw, torch.device("cpu"))
    np.testing.assert_array_equal(raw.train[0], before)
    assert torch.equal(data.splits["train"].x, data.splits["val"].x)


def test_linear_fit_has_a_bias_and_the_naive_forecast_undoes_the_normalisation():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])[:, None]  # (N, 1, 2)
    y = (3 * x[:, 0, :1] - x[:, 0, 1:] + 5).double()  # (N, 1), a bias of 5
    weights = baselines.fit_linear(x.double(), y)
    assert torch.allclose(weights.flatten(), torch.tensor([3.0, -1.0, 5.0], dtype=torch.float64), atol=1e-9)
    assert torch.equal(baselines.naive(torch.tensor([[[0.0, 2.0]]]), 3, mean=1.0, std=0.5),
                       torch.tensor([[2.0, 2.0, 2.0]]))


def test_model_ratio_to_each_baseline():
    found = {"naive": {"mae": 0.5, "mse": 0.3}, "linear": {"mae": 0.2, "mse": 0.1}}
    out = baselines.compared(found, {"test/mae": 0.1}, {"test/mae": 0.25})
    assert out["naive"] == {"mae": 0.5, "mse": 0.3, "model_mae_ratio": {"best": pytest.approx(0.2),
                                                                         "final": pytest.approx(0.5)}}
    assert out["linear"]["model_mae_ratio"] == {"best": pytest.approx(0.5), "final": pytest.approx(1.25)}


def test_sequence_baselines_are_cheap_and_on_the_test_split():
    data = build_data(load_sequence(4000, 50, 5, 2, 0.05, 0.1, 0.2, 0), torch.device("cpu"))
    started = time.perf_counter()
    found = baselines.baselines(data)
    assert time.perf_counter() - started < 1.0
    x, y = data.splits["test"].x.double(), data.splits["test"].y.double()
    last = x[:, 0, -1] * data.std[0] + data.mean[0]  # the raw last input value
    assert found["naive"]["mae"] == pytest.approx((last[:, None] - y).abs().mean().item(), rel=1e-6)
    assert found["linear"]["mae"] < found["naive"]["mae"] / 2  # a sum of sines is nearly linear in its past


def test_classification_has_no_baselines():
    assert baselines.baselines(build_data(load_digits(0.2, 0.1, 0), torch.device("cpu"))) == {}


def test_the_final_table_shows_each_baseline_and_the_models_ratio():
    from rich.console import Console

    summary = {"status": "completed", "best": {"epoch": 3, "test/mae": 0.1}, "final": {"test/mae": 0.2},
               "baselines": baselines.compared({"naive": {"mae": 0.5, "mse": 0.3}, "linear": {"mae": 0.25, "mse": 0.1}},
                                               {"test/mae": 0.1}, {"test/mae": 0.2}),
               "model": {"parameters": {"total": 10, "trainable": 10}},
               "cost": {"latency_ms": {"batch_1": 0.1, "batch_64": 1.0}, "latency": {"threads": 1}, "size_mb": 0.1,
                        "flops_per_sample": 100, "peak_memory_mb": 100, "memory": "process RSS"},
               "wall_time_s": 1.0, "train": {"samples_per_s": 100.0}, "device": "cpu", "run_dir": "run"}
    console = Console(width=200, record=True)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "naive baseline test/mae 0.5000" in text and "model ×0.200" in text and "model ×0.400" in text
    assert "linear baseline test/mae 0.2500" in text and "model ×0.800" in text


def test_summary_of_a_sequence_run_holds_the_baselines(cli, tmp_path):
    ran = cli("dlrun", "hydra.run.dir=run", "dataset=sequence", "dataset.num_series=400", "model=rnn",
              "model.hidden_size=16", "trainer.epochs=1", *CPU, check=True)
    summary = read_summary(tmp_path / "run")
    found = summary["baselines"]
    data = build_data(load_sequence(400, 50, 5, 2, 0.05, 0.1, 0.2, 0), torch.device("cpu"))
    expected = baselines.baselines(data)
    for name in ("naive", "linear"):
        assert found[name]["mae"] == pytest.approx(expected[name]["mae"], rel=1e-9)
        assert found[name]["mse"] == pytest.approx(expected[name]["mse"], rel=1e-9)
        for which in ("best", "final"):
            assert found[name]["model_mae_ratio"][which] == pytest.approx(
                summary[which]["test/mae"] / found[name]["mae"])
    assert f"naive baseline test/mae {found['naive']['mae']:.4f}" in ran.stdout
