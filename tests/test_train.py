"""The loop in-process: it learns, evaluates exactly, picks the best epoch, stops cleanly and resumes exactly."""

from __future__ import annotations

import signal

import pytest
import torch
import torch.nn.functional as F

from conftest import loop_settings, model_of
from dlrun import checkpoint
from dlrun.data import TensorSplit, build_data, epoch_generator, load_digits
from dlrun.optim import cosine_lr
from dlrun.errors import Interrupted, NonFiniteLoss
from dlrun.train import Parts, StopFlag, at_least_as_good, evaluate, fit, improved

TIMING = {"seconds", "samples_per_s"}


@pytest.fixture(scope="module")
def digits():
    return build_data(load_digits(0.2, 0.1, 0), torch.device("cpu"))


class Recorder:
    """A sink that keeps what the loop sends, and can raise a stop flag at a given step."""

    def __init__(self, stop: StopFlag | None = None, stop_at: int | None = None):
        self.records, self.steps, self.stop, self.stop_at = [], [], stop, stop_at

    def start(self, epochs, total_steps, done_steps):
        pass

    def step(self, epoch, step, loss, samples_per_s):
        self.steps.append(step)
        if step == self.stop_at:
            self.stop.signum = signal.SIGTERM  # what the SIGTERM handler in run.py does

    def epoch(self, record):
        self.records.append({k: v for k, v in record.items() if k not in TIMING})

    def close(self, summary):
        pass


def fit_config(epochs=3, monitor="val/acc", mode="max", eval_every=1, **kw):
    return loop_settings("classification", epochs=epochs, batch_size=64, eval_batch_size=256, seed=0,
                         eval_every=eval_every, log_every=kw.pop("log_every", 5), monitor=monitor, monitor_mode=mode,
                         **kw)


def build(digits, seed=0, lr=3e-3, dropout=0.0, scheduler=False, epochs=3):
    torch.manual_seed(seed)
    model = model_of("model.channels=[8,16]", "model.hidden=32", f"model.dropout={dropout}")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = None
    if scheduler:
        sched = cosine_lr(opt, steps_per_epoch=20, total_steps=20 * epochs, mode="max", min_lr_ratio=0.0)
    return model, opt, sched


def fit_digits(digits, cfg, **build_kw):
    model, opt, sched = build(digits, epochs=cfg.epochs, **build_kw)
    rec, calls = Recorder(), []
    state = fit(Parts(model, opt, sched), digits, cfg, [rec], lambda s, b: calls.append((s.epoch, s.batch, b)))
    return model, state, rec.records, calls


def test_fit_learns_and_records_every_epoch(digits):
    _, state, history, calls = fit_digits(digits, fit_config(epochs=4))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["step"] for r in history] == [20, 40, 60, 80]  # 1259 samples / 64 = 20 steps per epoch
    assert state.step == 80 and state.epoch == 4 and state.batch == 0
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert history[-1]["val/acc"] > 0.8  # chance is 0.1
    assert [c[0] for c in calls] == [1, 2, 3, 4]


def test_best_epoch_follows_the_monitor(digits):
    _, state, history, calls = fit_digits(digits, fit_config(epochs=4, monitor="val/loss", mode="min"))
    losses = [r["val/loss"] for r in history]
    assert state.best_epoch == 1 + losses.index(min(losses)) and state.best_value == min(losses)
    assert state.best_metrics["val/loss"] == min(losses)
    assert calls[state.best_epoch - 1][2] is True


def test_eval_every_skips_validation_but_not_the_last_epoch(digits):
    _, _, history, _ = fit_digits(digits, fit_config(epochs=3, eval_every=2))
    assert ["val/acc" in r for r in history] == [False, True, True]


def test_checkpoint_every_n_steps_saves_mid_epoch(digits):
    _, _, _, calls = fit_digits(digits, fit_config(epochs=2, checkpoint_every=8))
    # mid-epoch saves at steps 8, 16 (epoch 1) and 24, 32 (epoch 2), plus one per epoch end
    assert calls == [(0, 8, False), (0, 16, False), (1, 0, True), (1, 4, False), (1, 12, False), (2, 0, calls[-1][2])]


def test_interrupt_mid_epoch_and_resume_is_exact(digits, tmp_path):
    """Stop at step 13 of epoch 1 (of 3), checkpoint, rebuild everything from scratch, continue:
    the final weights and every epoch's metrics equal those of the uninterrupted run (dropout and a
    per-batch scheduler included)."""
    cfg = fit_config(epochs=3, log_every=1, warmup_epochs=0.5)
    kw = dict(dropout=0.3, scheduler=True, epochs=3)

    model, opt, sched = build(digits, **kw)
    straight = Recorder()
    fit(Parts(model, opt, sched), digits, cfg, [straight], lambda s, b: None)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    parts = Parts(*build(digits, **kw))
    stop = StopFlag()
    first = Recorder(stop, stop_at=33)  # epoch 2, batch 13
    path = tmp_path / "last.pt"

    def save(state, is_best):
        checkpoint.save(checkpoint.training_checkpoint(parts, state), path)

    with pytest.raises(Interrupted, match="SIGTERM after step 33"):
        fit(parts, digits, cfg, [first], save, stop=stop)

    torch.rand(100)  # disturb the global RNG: resuming must restore it
    parts = Parts(*build(digits, seed=123, **kw))
    state = checkpoint.restore_training(checkpoint.load(path), parts)
    assert (state.epoch, state.batch, state.step) == (1, 13, 33)
    second = Recorder()
    fit(parts, digits, cfg, [second], lambda s, b: None, state=state)

    assert first.records + second.records == straight.records
    for key, value in parts.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def poisoned(digits, n=32):
    """The digits with the first n training samples set to NaN: batches holding them have a NaN loss."""
    split = digits.splits["train"]
    x, y = split.x, split.y
    x = x.clone()
    x[:n] = float("nan")
    return type(digits)(digits.spec, {**digits.splits, "train": TensorSplit(x, y)})


def test_nonfinite_loss_stops_and_names_the_step(digits):
    order = torch.randperm(len(digits.splits["train"]), generator=epoch_generator(0, 1))
    first_bad_step = 1 + int((order < 32).nonzero()[0]) // 64
    saves = []
    model, opt, _ = build(digits)
    with pytest.raises(NonFiniteLoss, match=rf"became nan at step {first_bad_step} \(epoch 1\)"):
        fit(Parts(model, opt), poisoned(digits), fit_config(epochs=2, checkpoint_every=100), [],
            lambda s, b: saves.append(s.step))
    assert saves == []  # no checkpoint of broken weights


def test_huge_lr_is_caught(digits):
    model, opt, _ = build(digits)
    opt = torch.optim.SGD(model.parameters(), lr=1e4)
    with pytest.raises(NonFiniteLoss, match=r"became (nan|inf) at step \d+ \(epoch 1\)"):
        fit(Parts(model, opt), digits, fit_config(epochs=2), [], lambda s, b: None)


def test_nonfinite_batches_can_be_skipped(digits):
    model, opt, _ = build(digits)
    rec = Recorder()
    fit(Parts(model, opt), poisoned(digits), fit_config(epochs=1, on_nonfinite="skip"), [rec], lambda s, b: None)
    (record,) = rec.records
    assert 1 <= record["skipped_batches"] <= 20
    assert torch.isfinite(torch.tensor([record["train/loss"], record["val/loss"]])).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluate_matches_a_direct_computation(digits):
    model = model_of("model.channels=[4]", "model.hidden=0")
    split = digits.splits["test"]
    x, y = split.x, split.y
    got = evaluate(model, split, batch_size=7)  # batch size that does not divide the split
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert got["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_improved():
    assert improved(0.5, None, "max") and improved(0.6, 0.5, "max") and not improved(0.5, 0.5, "max")
    assert improved(0.4, 0.5, "min") and not improved(0.6, 0.5, "min")
    # the best epoch: ties go to the later epoch; NaN never becomes the best
    assert at_least_as_good(0.5, 0.5, "max") and at_least_as_good(0.5, 0.5, "min") and at_least_as_good(1.0, None, "max")
    assert not at_least_as_good(0.4, 0.5, "max") and not at_least_as_good(float("nan"), 0.5, "max")


def test_regression_loss_is_the_same_quantity_in_training_and_evaluation():
    """Evaluation used to sum the (N, horizon) squared errors and divide by N: horizon times the
    training loss of the same data."""
    from dlrun.data import load_sequence
    from dlrun.losses import loss_and_score

    data = build_data(load_sequence(num_series=200, length=20, horizon=5, num_sines=2, noise=0.05,
                                    val_fraction=0.1, test_fraction=0.2, seed=0), torch.device("cpu"))
    torch.manual_seed(0)
    model = model_of("model=rnn", "model.cell=gru", "model.hidden_size=8", shape=data.spec.input_shape,
                     outputs=data.spec.num_outputs).eval()
    split = data.splits["test"]
    x, y = next(iter(split.batches(len(split))))
    with torch.no_grad():
        trained_as, _ = loss_and_score(model(x), y, "regression")  # what a training step reports
    evaluated = evaluate(model, split, batch_size=7, task="regression")["loss"]  # in uneven batches
    assert evaluated == pytest.approx(trained_as.item(), rel=1e-5)
    assert evaluated == pytest.approx(F.mse_loss(model(x), y).item(), rel=1e-5)
