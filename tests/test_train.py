"""The loop in-process: it learns, evaluates exactly, and picks the best epoch by the monitor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlrun.data import build_data, load_digits
from dlrun.models import CNN
from dlrun.train import FitConfig, evaluate, fit, improved


@pytest.fixture(scope="module")
def digits():
    return build_data(load_digits(0.2, 0.1, 0), torch.device("cpu"))


def fit_digits(digits, epochs=3, monitor="val/acc", mode="max", eval_every=1):
    torch.manual_seed(0)
    model = CNN(digits.spec.input_shape, 10, channels=[8, 16], hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cfg = FitConfig(epochs=epochs, batch_size=64, eval_batch_size=256, seed=0, eval_every=eval_every,
                    log_every=5, monitor=monitor, mode=mode)
    calls = []
    state, history, best = fit(model, digits, opt, None, cfg, [], lambda s, b: calls.append((s.epoch, b)))
    return model, state, history, best, calls


def test_fit_learns_and_records_every_epoch(digits):
    model, state, history, _, calls = fit_digits(digits, epochs=4)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["step"] for r in history] == [20, 40, 60, 80]  # 1257 samples / 64 = 20 steps per epoch
    assert state.step == 80 and state.epoch == 4
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert history[-1]["val/acc"] > 0.8  # chance is 0.1
    assert [c[0] for c in calls] == [1, 2, 3, 4]


def test_best_epoch_follows_the_monitor(digits):
    _, state, history, _, calls = fit_digits(digits, epochs=4, monitor="val/loss", mode="min")
    losses = [r["val/loss"] for r in history]
    assert state.best_epoch == 1 + losses.index(min(losses)) and state.best_value == min(losses)
    assert [is_best for _, is_best in calls].count(True) >= 1


def test_eval_every_skips_validation_but_not_the_last_epoch(digits):
    _, _, history, _, _ = fit_digits(digits, epochs=3, eval_every=2)
    assert ["val/acc" in r for r in history] == [False, True, True]


def test_evaluate_matches_a_direct_computation(digits):
    model = CNN(digits.spec.input_shape, 10, channels=[4], hidden=0)
    x, y = digits.splits["test"]
    got = evaluate(model, x, y, batch_size=7)  # batch size that does not divide the split
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert got["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_improved():
    assert improved(0.5, None, "max") and improved(0.6, 0.5, "max") and not improved(0.5, 0.5, "max")
    assert improved(0.4, 0.5, "min") and not improved(0.6, 0.5, "min")
