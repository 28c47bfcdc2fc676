"""The benchmarks run (at their smallest sizes) and print well-formed results; speed itself is never asserted.

Each bench's `main` is called in this process, as `python bench/<name>.py <options>` would call it.
Those that time or start processes (commands, fresh interpreters, DDP ranks, sweep workers) are slow."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Callable

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch, capfd) -> Callable[..., tuple[dict, str]]:
    """`bench("threads.py", "--repeats", "1")`: the script's JSON line (its last line) and all it printed,
    its worker processes' output included (hence capfd)."""
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import each other and bench/common.py

    def call(script: str, *args: str) -> tuple[dict, str]:
        module = importlib.import_module(Path(script).stem)
        monkeypatch.setattr(sys, "argv", [str(BENCH / script), *args])
        capfd.readouterr()
        module.main()
        out = capfd.readouterr().out
        return json.loads(out.strip().splitlines()[-1]), out

    return call


def test_data_pipeline(bench, tmp_path):
    result, out = bench("data_pipeline.py", "--samples", "128", "--batch-size", "64", "--repeats", "1",
                        "--data-dir", str(tmp_path))
    assert result["bench"] == "data_pipeline" and result["device"] == "cpu"
    assert result["ratio"] == pytest.approx(result["dlrun_samples_per_s"] / result["torchvision_samples_per_s"])
    assert "ratio (dlrun / torchvision)" in out


def test_loop_overhead(bench):
    result, out = bench("loop_overhead.py", "--samples", "64", "--batch-size", "32", "--epochs", "1")
    assert [r["model"] for r in result["results"]] == ["cnn", "rnn", "mlp"]
    for r in result["results"]:
        assert r["vs_naive"] == pytest.approx(r["dlrun_samples_per_s"] / r["naive_samples_per_s"])
        assert r["vs_fast"] == pytest.approx(r["dlrun_samples_per_s"] / r["fast_samples_per_s"])
        assert r["naive_range"][0] <= r["naive_samples_per_s"] <= r["naive_range"][1]
    assert [r["channels_last"] for r in result["results"]] == [True, False, False]  # a 2-D CNN on the CPU


@pytest.mark.slow
def test_threads(bench):
    result, out = bench("threads.py", "--repeats", "1", "--steps", "1")
    assert {"idle 1 threads default", "idle 2 threads PASSIVE", "busy 2 threads default"} <= result.keys()
    assert result["busy: 2 threads default / PASSIVE (collapse avoided)"] == pytest.approx(
        result["busy 2 threads default"] / result["busy 2 threads PASSIVE"])


@pytest.mark.slow
def test_end_to_end(bench, tmp_path):
    result, out = bench("end_to_end.py", "--samples", "128", "--data-dir", str(tmp_path), "--repeats", "1")
    plain, ours = result["plain PyTorch + torchvision DataLoader"], result["dlrun (whole command)"]
    assert result["ratio"] == pytest.approx(plain / ours) and ours > 0
    low, high = result["dlrun (whole command) range"]
    assert low <= ours <= high and result["repeats"] == 1 and ", 1 runs)" in out


@pytest.mark.slow
def test_startup(bench):
    result, _ = bench("startup.py", "--repeats", "1")
    assert {"dlrun --help", "dlrun --cfg job", 'python -c "import torch"'} <= result.keys()


@pytest.mark.slow
def test_sweep(bench):
    result, _ = bench("sweep.py", "--jobs", "1", "--epochs", "1", "--repeats", "1")
    assert result["jobs"] == 1 and result["ratio"] > 0


@pytest.mark.slow
def test_ddp_overhead(bench):
    result, out = bench("ddp_overhead.py", "--samples", "128", "--batch-size", "64", "--epochs", "1", "--models", "mlp")
    assert result["processes"] == 2 and [r["model"] for r in result["results"]] == ["mlp"]
    (r,) = result["results"]
    assert r["ratio"] == pytest.approx(r["dlrun_samples_per_s"] / r["plain_samples_per_s"])
    assert "plain DDP samples/s" in out


@pytest.mark.slow
def test_post_training(bench):
    result, out = bench("post_training.py", "--repeats", "1", "--samples", "128")
    for name in ("default run (digits CNN, 15 epochs)", "MNIST CNN, one epoch"):
        r = result[name]
        assert 0 < r["after_training_s"] and r["share"] == pytest.approx(r["after_training_s"] / r["train_s"])
    assert "% of training" in out
