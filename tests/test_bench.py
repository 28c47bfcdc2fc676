"""The benchmarks run (at tiny sizes) and print well-formed results; speed itself is never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench(script: str, *args: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


def test_data_pipeline(tmp_path):
    result, out = bench("data_pipeline.py", "--samples", "600", "--data-dir", str(tmp_path))
    assert result["bench"] == "data_pipeline" and result["device"] == "cpu"
    assert result["ratio"] == pytest.approx(result["dlrun_samples_per_s"] / result["torchvision_samples_per_s"])
    assert "ratio (dlrun / torchvision)" in out


def test_loop_overhead():
    result, out = bench("loop_overhead.py", "--samples", "256", "--epochs", "2")
    assert [r["model"] for r in result["results"]] == ["cnn", "rnn", "mlp"]
    for r in result["results"]:
        assert r["vs_naive"] == pytest.approx(r["dlrun_samples_per_s"] / r["naive_samples_per_s"])
        assert r["vs_fast"] == pytest.approx(r["dlrun_samples_per_s"] / r["fast_samples_per_s"])
        assert r["naive_range"][0] <= r["naive_samples_per_s"] <= r["naive_range"][1]
    assert [r["channels_last"] for r in result["results"]] == [True, False, False]  # a 2-D CNN on the CPU


def test_threads():
    result, out = bench("threads.py", "--repeats", "1", "--steps", "5")
    assert {"idle 1 threads default", "idle 2 threads PASSIVE", "busy 2 threads default"} <= result.keys()
    assert result["busy: 2 threads default / PASSIVE (collapse avoided)"] == pytest.approx(
        result["busy 2 threads default"] / result["busy 2 threads PASSIVE"])


def test_end_to_end(tmp_path):
    result, out = bench("end_to_end.py", "--samples", "600", "--data-dir", str(tmp_path), "--repeats", "2")
    plain, ours = result["plain PyTorch + torchvision DataLoader"], result["dlrun (whole command)"]
    assert result["ratio"] == pytest.approx(plain / ours) and ours > 0
    low, high = result["dlrun (whole command) range"]
    assert low <= ours <= high and result["repeats"] == 2 and ", 2 runs)" in out


def test_startup():
    result, _ = bench("startup.py", "--repeats", "1")
    assert {"dlrun --help", "dlrun --cfg job", 'python -c "import torch"'} <= result.keys()


def test_sweep():
    result, _ = bench("sweep.py", "--jobs", "2", "--epochs", "1", "--repeats", "1")
    assert result["jobs"] == 2 and result["ratio"] > 0


def test_ddp_overhead():
    result, out = bench("ddp_overhead.py", "--samples", "512", "--epochs", "2", "--models", "mlp")
    assert result["processes"] == 2 and [r["model"] for r in result["results"]] == ["mlp"]
    (r,) = result["results"]
    assert r["ratio"] == pytest.approx(r["dlrun_samples_per_s"] / r["plain_samples_per_s"])
    assert "plain DDP samples/s" in out


def test_post_training():
    result, out = bench("post_training.py", "--repeats", "1", "--samples", "600")
    for name in ("default run (digits CNN, 15 epochs)", "MNIST CNN, one epoch"):
        r = result[name]
        assert 0 < r["after_training_s"] and r["share"] == pytest.approx(r["after_training_s"] / r["train_s"])
    assert "% of training" in out
