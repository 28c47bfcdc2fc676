"""Fast paths taken by default where they are faster: fused optimizer kernels, channels-last CNNs."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dlrun.device import use_channels_last
from dlrun.models import build_model
from dlrun.optim import build_optimizer
from dlrun.run import run


def small_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
def test_optimizers_take_the_fused_kernel_unless_told_not_to(make_cfg, name):
    cfg = make_cfg(f"optimizer={name}").optimizer
    assert build_optimizer(cfg, small_model()).defaults["fused"] is True
    off = make_cfg(f"optimizer={name}", "optimizer.fused=false").optimizer
    assert not build_optimizer(off, small_model()).defaults["fused"]


def test_a_config_saved_before_fused_existed_keeps_the_unfused_step(make_cfg):
    saved = OmegaConf.to_container(make_cfg("optimizer=adam").optimizer)
    del saved["fused"]
    assert not build_optimizer(OmegaConf.create(saved), small_model()).defaults["fused"]


def test_a_fused_step_matches_the_plain_step(make_cfg):
    results = []
    for fused in ("true", "false"):
        torch.manual_seed(0)
        model = small_model()
        opt = build_optimizer(make_cfg("optimizer=adamw", f"optimizer.fused={fused}").optimizer, model)
        for _ in range(5):
            opt.zero_grad()
            model(torch.ones(3, 4)).square().sum().backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name, shape, device, amp, expected", [
    ("cnn", (1, 8, 8), "cpu", None, True),            # 2-D convolutions on the CPU
    ("cnn", (1, 8, 8), "cpu", torch.bfloat16, False),  # oneDNN's bf16 NHWC convolutions: wrong for some shapes
    ("cnn", (1, 40), "cpu", None, False),             # 1-D signal
    ("mlp", (1, 8, 8), "cpu", None, False),
    ("rnn", (1, 8, 8), "cpu", None, False),
    ("cnn", (1, 8, 8), "cuda", None, False),          # fp32 on CUDA: not measured, left NCHW
    ("cnn", (1, 8, 8), "cuda", torch.bfloat16, True),  # under autocast on CUDA
])
def test_channels_last_is_decided_by_model_input_and_device(make_cfg, model_name, shape, device, amp, expected):
    model = build_model(make_cfg(f"model={model_name}").model, shape, 10)
    assert use_channels_last(None, model, shape, torch.device(device), amp) is expected
    assert use_channels_last(True, model, shape, torch.device(device), amp) is True
    assert use_channels_last(False, model, shape, torch.device(device), amp) is False


def test_the_default_run_trains_channels_last_with_fused_adam(make_cfg, tmp_path):
    summary = run(make_cfg("trainer.epochs=1", "device=cpu"), run_dir=tmp_path / "a")
    assert summary["channels_last"] is True
    assert run(make_cfg("trainer.epochs=1", "device=cpu", "model=mlp"), run_dir=tmp_path / "b")["channels_last"] is False
