"""What a model costs, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from conftest import model_of
from dlrun.cost import (LATENCY_BATCH_CAP, flops_per_sample, latency, model_cost, peak_memory_mb, run_latency_budget,
                        size_mb, time_calls)
from dlrun.run import run

CPU = torch.device("cpu")


def test_cnn_flops_and_size_by_hand():
    # conv 1->4 (3x3) on 8x8, pool, conv 4->8 on 4x4, pool, fc 8*2*2 -> 16, fc 16 -> 10 (a multiply-add = 2 FLOPs)
    model = model_of("model.channels=[4,8]", "model.kernel_size=3", "model.pool=max", "model.batch_norm=true",
                     "model.hidden=16")
    expected = 2 * (8 * 8 * 4 * 1 * 9) + 2 * (4 * 4 * 8 * 4 * 9) + 2 * (32 * 16) + 2 * (16 * 10)
    assert flops_per_sample(model, (1, 8, 8), CPU) == expected == 15168
    params = (4 * 9) + (8 * 4 * 9) + (32 * 16 + 16) + (16 * 10 + 10) + 2 * (4 + 8)  # + batch-norm weight and bias
    running_stats = 2 * (4 + 8)  # batch norm's running mean and var, float32
    counters = 2  # num_batches_tracked, int64
    assert size_mb(model) == pytest.approx((4 * params + 4 * running_stats + 8 * counters) / 2**20)


@pytest.mark.parametrize("cell,gates", [("lstm", 4), ("gru", 3), ("rnn", 1)])
def test_recurrent_flops_are_counted(cell, gates):
    steps, features, hidden = 40, 1, 32
    model = model_of("model=rnn", f"model.cell={cell}", f"model.hidden_size={hidden}", shape=(features, steps))
    per_step = 2 * gates * hidden * (features + hidden)
    assert flops_per_sample(model, (features, steps), CPU) == steps * per_step + 2 * hidden * 10


def test_mlp_flops():
    assert flops_per_sample(model_of("model=mlp", "model.hidden=[16]"), (1, 8, 8), CPU) == 2 * 64 * 16 + 2 * 16 * 10


def test_latency_and_memory_are_measured():
    model = model_of("model=mlp", "model.hidden=[256]", shape=(1, 28, 28))
    one = latency(model, (1, 28, 28), 1, CPU, threads=1, min_run_time=0.01)
    assert one["batch"] == 1 and one["threads"] == 1 and one["blocks"] >= 3 and one["calls_per_block"] >= 1
    assert 0 < one["min_ms"] <= one["median_ms"] <= one["max_ms"] and one["iqr_ms"] >= 0
    peak, kind = peak_memory_mb(CPU)
    assert kind == "process RSS" and peak > 50  # torch alone takes more than that
    cost = model_cost(model, (1, 28, 28), 64, CPU, 1.0, threads=1)
    assert set(cost["latency_ms"]) == {"batch_1", "batch_64"} and cost["parameters"]["total"] == 784 * 256 + 2 * 256 + 2570
    detail = cost["latency"]
    assert detail["threads"] == 1 and "timeit" in detail["method"]
    for key, batch in (("batch_1", 1), ("batch_64", 64)):
        assert detail[key]["batch"] == batch and detail[key]["median_ms"] == cost["latency_ms"][key]
        assert {"iqr_ms", "min_ms", "max_ms", "blocks", "calls_per_block"} <= set(detail[key])


def test_a_run_times_its_latency_within_a_share_of_its_training_time():
    assert run_latency_budget(1.0) == 0.01 and run_latency_budget(3.0) == 0.03 and run_latency_budget(600) == 0.05
    assert run_latency_budget(0.0) == 0.01


def test_latency_batch_is_capped():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(len(x))
            return x.sum()

    out = latency(Spy(), (3,), 100_000, CPU, threads=1, min_run_time=0.01)
    assert out["batch"] == LATENCY_BATCH_CAP == 256 and set(seen) == {256}


def test_time_calls_counts_every_call():
    calls = []
    out = time_calls(lambda: calls.append(1), threads=1, min_run_time=0.01)
    # block sizing (the warm-up) plus at least 3 timed blocks of calls_per_block calls each
    assert out["blocks"] >= 3 and len(calls) >= out["blocks"] * out["calls_per_block"]


def test_a_huge_batch_run_measures_at_most_the_cap(make_cfg, tmp_path):
    summary = run(make_cfg("trainer.epochs=1", "device=cpu", "trainer.batch_size=100000"), run_dir=tmp_path)
    assert set(summary["cost"]["latency_ms"]) == {"batch_1", "batch_256"}
    assert summary["cost"]["latency"]["batch_256"]["batch"] == 256


def test_every_run_reports_its_cost(make_cfg, tmp_path):
    summary = run(make_cfg("trainer.epochs=1", "device=cpu"), run_dir=tmp_path)
    cost = summary["cost"]
    assert cost["parameters"] == summary["model"]["parameters"]
    assert cost["flops_per_sample"] == 694784  # the default CNN on 8x8 digits
    assert cost["size_mb"] > 0.2 and cost["peak_memory_mb"] > 0 and cost["latency_ms"]["batch_64"] > 0
    assert cost["latency"]["threads"] == summary["threads"] and cost["latency"]["batch_64"]["batch"] == 64


def test_a_measurement_stays_within_its_budget():
    import time

    calls = []
    # each call takes at least 2 ms, so a 0.05 s budget holds at most 25 timed calls, plus 2 warm-up calls
    out = time_calls(lambda: calls.append(time.sleep(0.002)), threads=1, min_run_time=0.05)
    assert len(calls) == 2 + out["blocks"] * out["calls_per_block"] <= 2 + 25
    assert out["blocks"] >= 3 and out["min_ms"] >= 2.0
