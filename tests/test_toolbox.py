"""Each training-loop switch, tested for what it does."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import CPU, loop_settings, model_of, read_metrics, read_summary
from dlrun.data import batches, build_data, channels_last, epoch_generator, load_digits
from dlrun.models import MLP
from dlrun.optim import build_optimizer
from dlrun.run import run
from dlrun.train import Parts, TrainState, early_stop, fit, train_step


@pytest.fixture(scope="module")
def digits():
    return build_data(load_digits(0.2, 0.1, 0), torch.device("cpu"))


def cfg(*overrides: str, **kw):
    """The loop's settings: conf/trainer's, with these (and `overrides`, `kw`) on top."""
    base = dict(epochs=1, batch_size=64, eval_batch_size=256, seed=0, eval_every=1, log_every=5,
                monitor="val/acc", monitor_mode="max")
    return loop_settings("classification", *overrides, **{**base, **kw})


def plain_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP((1, 8, 8), 10, hidden=[32], batch_norm=False, dropout=0.0)


def first_batch(digits, n=64):
    split = digits.splits["train"]
    x, y = split.x, split.y
    return [(x[:n], y[:n])]


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_clipping_bounds_the_gradient_norm(digits):
    model = plain_mlp()
    train_step(Parts(model, torch.optim.SGD(model.parameters(), lr=0.1)), first_batch(digits), cfg(), torch.zeros(2))
    raw = grads(model).norm().item()
    assert raw > 0.05
    model = plain_mlp()
    train_step(Parts(model, torch.optim.SGD(model.parameters(), lr=0.1)), first_batch(digits), cfg(grad_clip=0.05), torch.zeros(2))
    assert grads(model).norm().item() == pytest.approx(0.05, rel=1e-4)
    model = plain_mlp()
    train_step(Parts(model, torch.optim.SGD(model.parameters(), lr=0.1)), first_batch(digits),
               cfg(grad_clip=1e-3, grad_clip_mode="value"), torch.zeros(2))
    assert grads(model).abs().max().item() <= 1e-3 + 1e-9


def test_accumulation_equals_a_k_times_larger_batch(digits):
    results = []
    for batch_size, accumulate in ((64, 1), (16, 4)):
        model = plain_mlp()
        parts = Parts(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        state = fit(parts, digits, cfg(batch_size=batch_size, accumulate=accumulate), [], lambda s, b: None)
        results.append((state.step, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (steps_a, w_a), (steps_b, w_b) = results
    assert steps_a == steps_b == 20  # 1259 samples: 20 batches of 64, or 79 of 16 grouped by 4
    torch.testing.assert_close(w_a, w_b, rtol=1e-4, atol=1e-5)


def test_ema_follows_the_decay_formula(digits):
    decay = 0.9
    model = plain_mlp()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    parts = Parts(model, torch.optim.SGD(model.parameters(), lr=0.5), ema=ema)
    expected = None
    split = digits.splits["train"]
    x, y = split.x, split.y
    for i in range(3):
        train_step(parts, [(x[64 * i: 64 * (i + 1)], y[64 * i: 64 * (i + 1)])], cfg(), torch.zeros(2))
        w = copy.deepcopy(model.state_dict())
        expected = w if expected is None else {k: decay * expected[k] + (1 - decay) * w[k] for k in w}
    averaged = ema.module.state_dict()
    for k in expected:
        torch.testing.assert_close(averaged[k], expected[k])
    assert not torch.equal(averaged["net.1.weight"], model.state_dict()["net.1.weight"])


def test_ema_is_evaluated_and_checkpointed(make_cfg, tmp_path):
    summary = run(make_cfg("trainer.epochs=2", "trainer.ema_decay=0.9", "trainer.monitor=val_ema/acc",
                           *CPU), run_dir=tmp_path)
    assert {"val_ema/acc", "test_ema/acc"} <= summary["best"].keys()
    assert summary["best"]["val_ema/acc"] == summary["monitor_value"]
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert last["ema"]["n_averaged"].item() == summary["steps"] and "ema" in best


@pytest.mark.parametrize(
    "values,mode,stop_at",
    [
        ([0.5, 0.6, 0.6, 0.61, 0.7], "max", 3),  # 0.61 is not 0.02 better than 0.6
        ([1.0, 0.9, 0.95, 0.85, 0.86, 0.9], "min", 5),
        ([0.1, 0.2, 0.3, 0.4], "max", None),
    ],
)
def test_early_stopping_on_a_scripted_sequence(values, mode, stop_at):
    state = TrainState()
    stops = [early_stop(state, v, patience=2, min_delta=0.02, mode=mode) for v in values]
    assert (stops.index(True) if True in stops else None) == stop_at


def test_early_stopping_ends_fit(digits):
    # train/loss falls every epoch, so in "max" mode it never improves after epoch 1
    model = plain_mlp()
    state = fit(Parts(model, torch.optim.Adam(model.parameters(), 1e-3)), digits,
                cfg("trainer.early_stopping.patience=2", epochs=10, monitor="train/loss", monitor_mode="max"), [],
                lambda s, b: None)
    assert state.stopped_early == 3 and state.epoch == 3 and state.best_epoch == 1


def test_label_smoothing_follows_the_formula(digits):
    eps = 0.2
    model = plain_mlp()
    (x, y), = first_batch(digits)
    with torch.no_grad():
        logp = F.log_softmax(model(x), dim=1)
    expected = ((1 - eps) * -logp.gather(1, y[:, None]).squeeze(1) + eps * -logp.mean(dim=1)).mean()
    last, skipped_samples, _ = train_step(Parts(model, torch.optim.SGD(model.parameters(), lr=0.1)),
                               first_batch(digits), cfg(label_smoothing=eps), torch.zeros(2))
    assert last.item() == pytest.approx(expected.item(), rel=1e-5) and skipped_samples == 0
    assert abs(expected - F.nll_loss(logp, y)) > 1e-3  # and differs from the unsmoothed loss


def test_no_weight_decay_on_norm_and_bias(make_cfg):
    torch.manual_seed(0)
    model = model_of("model.channels=[4]", "model.hidden=8", "model.batch_norm=true")
    opt = build_optimizer(make_cfg("optimizer=adamw", "optimizer.weight_decay=0.5", "optimizer.lr=0.1").optimizer,
                          model, decay_norm_and_bias=False)
    decayed, free = opt.param_groups
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in free["params"])
    assert decayed["weight_decay"] == 0.5 and free["weight_decay"] == 0.0
    before = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves the weights
    opt.step()
    after = model.state_dict()
    torch.testing.assert_close(after["head.net.1.weight"], before["head.net.1.weight"] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(after["head.net.1.bias"], before["head.net.1.bias"])
    torch.testing.assert_close(after["features.1.weight"], before["features.1.weight"])  # batch norm


def test_warmup_scales_the_lr_of_the_first_steps(digits):
    model = plain_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    train_step(Parts(model, opt), first_batch(digits), cfg(), torch.zeros(2), lr_scale=0.25)
    g = model.net[1].weight.grad
    torch.testing.assert_close(model.net[1].weight, before["net.1.weight"] - 0.1 * 0.25 * g)
    assert opt.param_groups[0]["lr"] == 0.1  # the scheduler's lr is untouched
    records = []

    class Keep:
        start = step = close = staticmethod(lambda *a: None)
        epoch = staticmethod(records.append)

    model = plain_mlp()
    fit(Parts(model, torch.optim.SGD(model.parameters(), lr=0.1)), digits, cfg(epochs=3, warmup_epochs=2), [Keep],
        lambda s, b: None)
    # 20 steps per epoch, 40 warmup steps: the last step of epoch 1 runs at 20/40 of the lr
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.1, 0.1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_runs_on_cpu(digits, dtype):
    model = plain_mlp()
    seen_dtypes = []
    model.net[-1].register_forward_hook(lambda m, i, o: seen_dtypes.append(o.dtype))
    scaler = torch.amp.GradScaler("cpu") if dtype is torch.float16 else None
    parts = Parts(model, torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    before = model.net[1].weight.detach().clone()
    totals = torch.zeros(2)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    last, skipped_samples, _ = train_step(parts, first_batch(digits), cfg(precision=precision), totals)
    assert seen_dtypes == [dtype]  # the forward ran in reduced precision
    assert torch.isfinite(last) and totals[0] == pytest.approx(64 * last.item(), rel=1e-4)
    assert not torch.equal(model.net[1].weight, before)
    assert model.net[1].weight.dtype is torch.float32  # master weights stay fp32
    if scaler is not None:
        assert scaler.get_scale() > 1


def test_channels_last_data_and_model(digits):
    data = channels_last(digits)
    x, y = data.splits["train"].x, data.splits["train"].y
    assert x.is_contiguous(memory_format=torch.channels_last)
    xb, _ = next(batches(x, y, 64, epoch_generator(0, 1)))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    model = model_of("model.channels=[8]").to(memory_format=torch.channels_last)
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    reference = model_of("model.channels=[8]")
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    torch.testing.assert_close(model(xb), reference(xb.contiguous()))


class DeterminismProbe(torch.nn.Module):
    """A user model (by `_target_`) that records whether deterministic algorithms are on."""

    seen: list[bool] = []

    def __init__(self, in_shape, num_outputs):
        super().__init__()
        self.fc = torch.nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_outputs)

    def forward(self, x):
        DeterminismProbe.seen.append(torch.are_deterministic_algorithms_enabled())
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("switch", [True, False])
def test_deterministic_mode_is_on_during_the_run_only(make_cfg, tmp_path, switch):
    DeterminismProbe.seen = []
    run(make_cfg("model=custom", "model._target_=test_toolbox.DeterminismProbe", "trainer.epochs=1",
                 f"trainer.deterministic={switch}", *CPU), run_dir=tmp_path)
    assert DeterminismProbe.seen and set(DeterminismProbe.seen) == {switch}
    assert torch.are_deterministic_algorithms_enabled() is False


def test_fast_dev_run(make_cfg, tmp_path):
    summary = run(make_cfg("debug=fast_dev_run", *CPU), run_dir=tmp_path)
    assert summary["steps"] == 1 and summary["epochs"] == 1
    assert summary["data"]["sizes"] == {"train": 1259, "val": 128, "test": 128}  # one eval batch of 128 each
    assert not (tmp_path / "checkpoints").exists()


def test_limit_batches(make_cfg, tmp_path):
    summary = run(make_cfg("debug=limit", "trainer.epochs=2", "trainer.eval_batch_size=50", *CPU),
                  run_dir=tmp_path)
    assert [m["step"] for m in read_metrics(tmp_path)] == [10, 20]
    assert summary["data"]["sizes"] == {"train": 1259, "val": 100, "test": 100}


def test_overfit_a_few_batches(make_cfg, tmp_path):
    summary = run(make_cfg("debug=overfit", "trainer.epochs=40", "trainer.batch_size=32", *CPU),
                  run_dir=tmp_path)
    assert summary["data"]["sizes"]["train"] == summary["data"]["sizes"]["val"] == 64
    assert summary["final"]["train/acc"] == 1.0 and summary["final"]["val/acc"] == 1.0
    assert summary["final"]["train/loss"] < 0.05


def test_precision_switch_end_to_end(make_cfg, tmp_path):
    summary = run(make_cfg("trainer.precision=bf16", "trainer.epochs=3", *CPU), run_dir=tmp_path)
    assert summary["best"]["val/acc"] > 0.8
    fp16 = run(make_cfg("trainer.precision=fp16", "trainer.epochs=1", *CPU), run_dir=tmp_path / "fp16")
    assert fp16["status"] == "completed"
    assert torch.load(tmp_path / "fp16" / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"] > 0


def test_users_own_module_by_target(cli, tmp_path, monkeypatch, request):
    # the command runs in this process: the module and the path it adds are forgotten afterwards, as its
    # own process would forget them
    monkeypatch.setattr(sys, "path", list(sys.path))
    request.addfinalizer(lambda: sys.modules.pop("my_pkg", None))
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text(
        "import torch\n"
        "class TinyNet(torch.nn.Module):\n"
        "    def __init__(self, in_shape, num_outputs, width):\n"
        "        super().__init__()\n"
        "        c, h, w = in_shape\n"
        "        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, width),\n"
        "                                        torch.nn.ReLU(), torch.nn.Linear(width, num_outputs))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    cli("dlrun", "hydra.run.dir=run", "model=custom", "model._target_=my_pkg.TinyNet", "+model.width=8",
        "optimizer.lr=0.01", "trainer.epochs=3", *CPU, check=True)
    summary = read_summary(tmp_path / "run")
    assert summary["model"]["class"] == "TinyNet"
    assert summary["model"]["parameters"]["total"] == 64 * 8 + 8 + 8 * 10 + 10
    assert summary["best"]["val/acc"] > 0.5  # chance is 0.1


def test_classic_comparison_is_one_sweep(cli, tmp_path):
    # 600 samples of MNIST-1D (as test_distill's): the sweep's jobs are what is checked, not their scores
    cli("dlrun", "-m", "model=mlp,cnn,rnn", "dataset=mnist1d", "dataset.num_samples=600", "trainer.epochs=1", *CPU,
        check=True)
    jobs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/?/summary.json"))
    assert [read_summary(j.parent)["model"]["class"] for j in jobs] == ["MLP", "CNN", "RNN"]


@pytest.mark.slow  # inductor compiles C++ in processes of its own (the compiler, its compile workers)
def test_compile_switch(make_cfg, tmp_path):
    summary = run(make_cfg("trainer.compile=true", "model=mlp", "trainer.epochs=2", *CPU), run_dir=tmp_path / "run")
    assert summary["best"]["val/acc"] > 0.8
    # the checkpoint holds the plain module's weights, loadable without torch.compile
    keys = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"].keys()
    assert not any(k.startswith("_orig_mod") for k in keys)
