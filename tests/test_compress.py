"""dlrun-compress: structured pruning removes the asked share of parameters or FLOPs and reloads without
Torch-Pruning; static int8 keeps the accuracy; ONNX Runtime agrees with PyTorch; bad options are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dlrun.compress import prune
from dlrun.compress.prune import cost_of, prune_globally, rebuilt_config, sparsity_of, structured
from dlrun.data import build_data, load_digits
from dlrun.errors import DlrunError
from dlrun.models import CNN, MLP
from dlrun.run import run
from dlrun.tools.compress import Plan, compress, load_variant, main
from dlrun.train import evaluate

CPU = torch.device("cpu")


def test_global_pruning_reaches_the_sparsity():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=[32, 32], batch_norm=False)
    targets = prune_globally(model, 0.75)
    assert sparsity_of(targets) == pytest.approx(0.75, abs=1e-3)
    # global: the layers end up with different sparsities, the smallest weights of all going first
    per_layer = [float((m.weight == 0).float().mean()) for m, _ in targets]
    assert len(set(round(p, 3) for p in per_layer)) > 1


CNN_CFG = {"_target_": "dlrun.models.CNN", "channels": [32, 64], "hidden": 128}
MLP_CFG = {"_target_": "dlrun.models.MLP", "hidden": [64, 32]}


@pytest.mark.parametrize("model_cfg", [CNN_CFG, MLP_CFG], ids=["cnn", "mlp"])
@pytest.mark.parametrize("by", ["params", "flops"])
@pytest.mark.parametrize("scope", ["global", "uniform"])
def test_structured_pruning_removes_the_asked_share(model_cfg, by, scope):
    torch.manual_seed(0)
    cls = CNN if "CNN" in model_cfg["_target_"] else MLP
    model = cls((1, 8, 8), 10, **{k: v for k, v in model_cfg.items() if k != "_target_"}).eval()
    before = {b: cost_of(model, b, (1, 8, 8)) for b in ("params", "flops")}
    pruned = structured(model, (1, 8, 8), 0.6, by, scope, "magnitude")
    after = {b: cost_of(pruned, b, (1, 8, 8)) for b in ("params", "flops")}
    kept = after[by] / before[by]
    assert 0.36 <= kept <= 0.40  # 40% kept, less at most one channel's worth
    assert after["params"] < before["params"] and after["flops"] < before["flops"]  # both really drop
    # a plain dlrun model at the pruned widths holds the pruned weights exactly
    config = rebuilt_config(pruned, OmegaConf.create(model_cfg))
    rebuilt = cls((1, 8, 8), 10, **{k: v for k, v in config.items() if k != "_target_"}).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(rebuilt(x), pruned(x))


def test_recurrent_models_get_a_reason():
    with pytest.raises(DlrunError, match="does not support model=rnn: Torch-Pruning 1.6 prunes only single-layer"):
        prune.check_structured(OmegaConf.create({"_target_": "dlrun.models.RNN"}))


def trained(tmp_path_factory, *overrides: str) -> Path:
    from hydra import compose, initialize_config_dir

    from dlrun.cli import config_dir
    from dlrun.config.schema import register_configs

    register_configs()
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=config_dir()):
        cfg = compose("config", overrides=[*overrides, "device=cpu", "device.threads=1"])
    run(cfg, run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return trained(tmp_path_factory, "model=mlp", "model.hidden=[64]", "trainer.epochs=8")


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    return trained(tmp_path_factory, "trainer.epochs=4")


def test_variants_are_measured_saved_and_loadable(trained_run):
    result = compress(trained_run, [0.5, 0.9], finetune_epochs=1, half=True, quantize=True, log=lambda s: None)
    names = [v["name"] for v in result["variants"]]
    assert names == ["original", "sparse-0.5", "sparse-0.9", "int8-dynamic", "bf16", "fp16"]
    by = {v["name"]: v for v in result["variants"]}
    base = by["original"]["test/acc"]
    assert base > 0.9
    assert by["sparse-0.5"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert by["sparse-0.9"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert by["sparse-0.9"]["compressed_mb"] < by["sparse-0.5"]["compressed_mb"]
    assert by["sparse-0.9"]["flops_per_sample"] == by["original"]["flops_per_sample"]  # zeros cost the same
    assert abs(by["int8-dynamic"]["delta"]) <= 0.02  # int8 keeps the accuracy on digits
    assert by["int8-dynamic"]["file_mb"] < 0.5 * by["original"]["file_mb"]
    assert abs(by["bf16"]["delta"]) <= 0.02 and abs(by["fp16"]["delta"]) <= 0.01
    assert json.loads((trained_run / "compress.json").read_text())["variants"][0]["name"] == "original"

    data = build_data(load_digits(0.2, 0.1, 0), CPU)
    for name in ("sparse-0.9", "int8-dynamic", "bf16"):
        model = load_variant(trained_run / "variants" / f"{name}.pt")  # weights_only, like any checkpoint
        assert evaluate(model, data.splits["test"], 512)["acc"] == pytest.approx(by[name]["test/acc"])


@pytest.fixture(scope="module")
def cnn_result(cnn_run):
    plan = Plan(prune=[0.5], by="flops", finetune_epochs=1, quantize=["static"], half=False, onnx=True)
    return compress(cnn_run, log=lambda s: None, threads=1, plan=plan)


def test_cnn_variants_side_by_side(cnn_run, cnn_result):
    by = {v["name"]: v for v in cnn_result["variants"]}
    assert list(by) == ["original", "pruned-flops-0.5", "int8-static", "original+onnxruntime",
                        "pruned-flops-0.5+onnxruntime"]
    original, pruned = by["original"], by["pruned-flops-0.5"]
    assert 0.45 <= pruned["flops_per_sample"] / original["flops_per_sample"] <= 0.5
    assert pruned["parameters"] < original["parameters"] and pruned["file_mb"] < original["file_mb"]
    assert original["test/acc"] > 0.85 and pruned["test/acc"] > 0.85  # fine-tuned one epoch
    assert abs(by["int8-static"]["delta"]) <= 0.02  # calibrated int8 keeps the accuracy on digits
    for name in ("original+onnxruntime", "pruned-flops-0.5+onnxruntime"):
        assert by[name]["max_abs_diff"] < 1e-4 and abs(by[name]["delta"] - by[name.split("+")[0]]["delta"]) < 1e-3
    for v in by.values():  # one measurement for all: medians at batch 1 and the run's batch, 1 thread
        assert set(v["latency_ms"]) == {"batch_1", "batch_64"} and v["latency"]["threads"] == 1
        assert v["latency"]["batch_64"]["batch"] == 64 and v["latency_ms"]["batch_1"] > 0
    assert cnn_result["threads"] == 1 and set(cnn_result["pareto"]) <= set(by)
    assert json.loads((cnn_run / "compress.json").read_text())["variants"][1]["name"] == "pruned-flops-0.5"
    assert (cnn_run / "variants" / "original.onnx").is_file() and (cnn_run / "variants" / "int8-static.pt2").is_file()


def test_a_pruned_variant_reloads_without_torch_pruning(cnn_run, cnn_result):
    acc = next(v for v in cnn_result["variants"] if v["name"] == "pruned-flops-0.5")["test/acc"]
    code = (
        "import sys, torch\n"
        "from dlrun.tools.compress import load_variant\n"
        "from dlrun.data import build_data, load_digits\n"
        "from dlrun.train import evaluate\n"
        f"model = load_variant({str(cnn_run / 'variants' / 'pruned-flops-0.5.pt')!r})\n"
        "data = build_data(load_digits(0.2, 0.1, 0), torch.device('cpu'))\n"
        "print(evaluate(model, data.splits['test'], 512)['acc'], 'torch_pruning' in sys.modules,"
        " sum(p.numel() for p in model.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    params = next(v for v in cnn_result["variants"] if v["name"] == "pruned-flops-0.5")["parameters"]
    assert float(out[0]) == pytest.approx(acc) and out[1] == "False" and int(out[2]) == params


@pytest.mark.parametrize("args,expected", [
    (["--prune", "1.5"], "--prune 1.5 is invalid: each must be in (0, 1)"),
    (["--prune", "0"], "--prune 0 is invalid: each must be in (0, 1)"),
    (["--quantize", "static,float8"], "--quantize 'float8' is invalid: allowed: dynamic, static"),
    (["--prune-by", "latency"], "--prune-by 'latency' is invalid: allowed: params, flops"),
    (["--importance", "random"], "--importance 'random' is invalid: allowed: magnitude, taylor"),
    (["--sparsity", "1"], "--sparsity 1 is invalid: each must be in [0, 1)"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(SystemExit) as stop:
        main([str(run_dir), *args])
    assert str(stop.value) == f"dlrun-compress: error: {expected}"
    assert list(run_dir.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dlrun-compress", "dlrun-optimize"])  # dlrun-optimize: the earlier name
def test_the_command(trained_run, name):
    command = str(Path(sys.executable).with_name(name))
    out = subprocess.run([command, str(trained_run), "--prune", "0.6", "--sparsity", "0.6", "--no-half", "--no-onnx",
                          "--quantize", "dynamic", "--threads", "1"], capture_output=True, text=True, check=True).stdout
    assert "pruned-flops-0.6" in out and "sparse-0.6" in out and "int8-dynamic" in out and "bf16" not in out
    assert "1 threads" in out
    bad = subprocess.run([command, str(trained_run), "--prune", "1.5"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip() == f"{name}: error: --prune 1.5 is invalid: each must be in (0, 1)"


def test_taylor_importance_and_steps_with_finetuning():
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 10, channels=[16, 32], hidden=64).eval()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    graded, tuned = [], []

    def grad_fn(m):
        graded.append(1)
        torch.nn.functional.cross_entropy(m(x), y).backward()

    before = cost_of(model, "params", (1, 8, 8))
    pruned = structured(model, (1, 8, 8), 0.5, "params", "global", "taylor", steps=2,
                        finetune=lambda m: tuned.append(cost_of(m, "params", (1, 8, 8))), grad_fn=grad_fn)
    assert graded and all(p.grad is None for p in pruned.parameters())  # gradients used, then dropped
    assert len(tuned) == 2 and 0.70 <= tuned[0] / before <= 0.75 and 0.45 <= tuned[1] / before <= 0.5
    assert cost_of(pruned, "params", (1, 8, 8)) == tuned[1]


def test_a_1d_network_is_quantised_as_the_same_network_in_2d():
    """Inductor cannot lower 1-D int8 convolutions (torch 2.14), so static int8 takes the 1-D CNN as
    2-D over a height-1 input: the same outputs; a network that works on the length itself stays 1-D."""
    from dlrun.compress.quantize import Rows2d, as_2d

    torch.manual_seed(0)
    model = CNN((1, 40), 10, channels=[8, 8], kernel_size=5, pool="max", batch_norm=True, hidden=16).eval()
    x = torch.randn(16, 1, 40)
    flat = as_2d(model, x)
    assert isinstance(flat, Rows2d) and not any(isinstance(m, torch.nn.Conv1d) for m in flat.modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in flat.modules())
    with torch.no_grad():
        assert torch.allclose(flat(x), model(x), atol=1e-6)

    class LastStep(torch.nn.Module):
        def forward(self, x):
            return x[..., -1]

    on_length = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), LastStep()).eval()
    assert as_2d(on_length, x) is on_length


@pytest.mark.slow
def test_static_int8_of_a_1d_cnn_runs_under_inductor():
    import torch._inductor.config as inductor

    from dlrun.compress.quantize import compiled, static_int8

    torch.manual_seed(0)
    model = CNN((1, 40), 10, channels=[8, 8], kernel_size=5, pool="max", batch_norm=False, hidden=0).eval()
    batches = [torch.randn(32, 1, 40) for _ in range(4)]
    quantised = static_int8(model, batches, batches[0])
    with inductor.patch(freezing=True), torch.no_grad():
        fast = compiled(quantised, batches[0])
        out = fast(batches[1])
    with torch.no_grad():
        reference = model(batches[1])
    assert out.shape == reference.shape and (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
