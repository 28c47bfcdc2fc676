"""dlrun-compress: structured pruning removes the asked share of parameters or FLOPs and reloads without
Torch-Pruning; static int8 keeps the accuracy; ONNX Runtime agrees with PyTorch; bad options are one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CPU, DLRUN, compose_config, model_of
from dlrun.compress import Plan, prune
from dlrun.compress.prune import cost_of, prune_globally, rebuilt_config, sparsity_of, structured
from dlrun.data import build_data, load_digits
from dlrun.errors import DlrunError
from dlrun.models import build_model
from dlrun.tools.variants import compress, load_variant
from dlrun.train import evaluate

COMPRESS = str(Path(DLRUN).with_name("dlrun-compress"))
MLP_RUN = ("model=mlp", "model.hidden=[64]", "trainer.epochs=8", *CPU)
CNN_RUN = ("trainer.epochs=3", *CPU)  # the digits CNN test_explain explains too
# dlrun-compress writes variants/ and compress.json into the run folder: each test compresses a copy of the shared run


def test_global_pruning_reaches_the_sparsity():
    torch.manual_seed(0)
    mlp = model_of("model=mlp", "model.hidden=[32,32]", "model.batch_norm=false")
    targets = prune_globally(mlp, 0.75)
    assert sparsity_of(targets) == pytest.approx(0.75, abs=1e-3)
    # global: the layers end up with different sparsities, the smallest weights of all going first
    per_layer = [float((m.weight == 0).float().mean()) for m, _ in targets]
    assert len(set(round(p, 3) for p in per_layer)) > 1


@pytest.mark.parametrize("overrides", [("model=cnn", "model.channels=[32,64]", "model.hidden=128"),
                                       ("model=mlp", "model.hidden=[64,32]")], ids=["cnn", "mlp"])
@pytest.mark.parametrize("by", ["params", "flops"])
@pytest.mark.parametrize("scope", ["global", "uniform"])
def test_structured_pruning_removes_the_asked_share(overrides, by, scope):
    torch.manual_seed(0)
    model_cfg = compose_config(*overrides).model
    original = build_model(model_cfg, (1, 8, 8), 10).eval()
    before = {b: cost_of(original, b, (1, 8, 8)) for b in ("params", "flops")}
    pruned = structured(original, (1, 8, 8), 0.6, by, scope, "magnitude")
    after = {b: cost_of(pruned, b, (1, 8, 8)) for b in ("params", "flops")}
    kept = after[by] / before[by]
    assert 0.36 <= kept <= 0.40  # 40% kept, less at most one channel's worth
    assert after["params"] < before["params"] and after["flops"] < before["flops"]  # both really drop
    # a plain dlrun model at the pruned widths holds the pruned weights exactly
    rebuilt = build_model(OmegaConf.create(rebuilt_config(pruned, model_cfg)), (1, 8, 8), 10).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(rebuilt(x), pruned(x))


def test_recurrent_models_get_a_reason():
    with pytest.raises(DlrunError, match="does not support model=rnn: Torch-Pruning 1.6 prunes only single-layer"):
        prune.check_structured(OmegaConf.create({"_target_": "dlrun.models.RNN"}))


def test_variants_are_measured_saved_and_loadable(trained, tmp_path):
    run = shutil.copytree(trained(*MLP_RUN), tmp_path / "run")
    plan = Plan(prune=[], sparsity=[0.5, 0.9], finetune_epochs=1, quantize=["dynamic"], half=True, onnx=False)
    result = compress(run, plan, log=lambda s: None)
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
    assert json.loads((run / "compress.json").read_text())["variants"][0]["name"] == "original"

    data = build_data(load_digits(0.2, 0.1, 0), torch.device("cpu"))
    for name in ("sparse-0.9", "int8-dynamic", "bf16"):
        loaded = load_variant(run / "variants" / f"{name}.pt")  # weights_only, like any checkpoint
        assert evaluate(loaded, data.splits["test"], 512)["acc"] == pytest.approx(by[name]["test/acc"])


def test_cnn_variants_side_by_side(trained, tmp_path):
    run = shutil.copytree(trained(*CNN_RUN), tmp_path / "run")
    plan = Plan(prune=[0.5], by="flops", finetune_epochs=1, quantize=["static"], half=False, onnx=True)
    result = compress(run, plan, log=lambda s: None, threads=1)
    by = {v["name"]: v for v in result["variants"]}
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
    assert result["threads"] == 1 and set(result["pareto"]) <= set(by)
    assert json.loads((run / "compress.json").read_text())["variants"][1]["name"] == "pruned-flops-0.5"
    assert (run / "variants" / "original.onnx").is_file() and (run / "variants" / "int8-static.pt2").is_file()


@pytest.mark.slow
def test_a_pruned_variant_reloads_without_torch_pruning(trained, tmp_path):
    """A fresh process: only there does "Torch-Pruning was never imported" show."""
    run = shutil.copytree(trained(*CNN_RUN), tmp_path / "run")
    plan = Plan(prune=[0.5], by="flops", finetune_epochs=1, quantize=[], half=False, onnx=False)
    (pruned,) = [v for v in compress(run, plan, log=lambda s: None, threads=1)["variants"]
                 if v["name"] == "pruned-flops-0.5"]
    code = (
        "import sys, torch\n"
        "from dlrun.tools.variants import load_variant\n"
        "from dlrun.data import build_data, load_digits\n"
        "from dlrun.train import evaluate\n"
        f"model = load_variant({str(run / 'variants' / 'pruned-flops-0.5.pt')!r})\n"
        "data = build_data(load_digits(0.2, 0.1, 0), torch.device('cpu'))\n"
        "print(evaluate(model, data.splits['test'], 512)['acc'], 'torch_pruning' in sys.modules,"
        " sum(p.numel() for p in model.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) == pytest.approx(pruned["test/acc"]) and out[1] == "False"
    assert int(out[2]) == pruned["parameters"]


@pytest.mark.parametrize("args,expected", [
    (["--prune", "1.5"], "--prune 1.5 is invalid: each must be in (0, 1)"),
    (["--prune", "0"], "--prune 0 is invalid: each must be in (0, 1)"),
    (["--quantize", "static,float8"], "--quantize 'float8' is invalid: allowed: dynamic, static"),
    (["--prune-by", "latency"], "--prune-by 'latency' is invalid: allowed: params, flops"),
    (["--importance", "random"], "--importance 'random' is invalid: allowed: magnitude, taylor"),
    (["--sparsity", "1"], "--sparsity 1 is invalid: each must be in [0, 1)"),
    (["--batch", "0"], "--batch 0 is invalid: must be >= 1"),  # it used to measure at the run's batch silently
])
def test_bad_options_are_one_line_and_write_nothing(cli, tmp_path, args, expected):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ran = cli("dlrun-compress", run_dir, *args)
    assert ran.returncode == 1 and ran.stderr == f"dlrun-compress: error: {expected}\n"
    assert list(run_dir.iterdir()) == []


def test_the_command(cli, trained, tmp_path):
    run = shutil.copytree(trained(*MLP_RUN), tmp_path / "run")
    out = cli("dlrun-compress", run, "--prune", "0.6", "--sparsity", "0.6", "--no-half", "--no-onnx",
              "--quantize", "dynamic", "--threads", "1", check=True).stdout
    assert "pruned-flops-0.6" in out and "sparse-0.6" in out and "int8-dynamic" in out and "bf16" not in out
    assert "1 threads" in out


def test_pruned_variants_are_fine_tuned_by_default(cli, trained, tmp_path):
    """With no fine-tuning option, structured pruning is followed by 10 epochs of the run's own loop, which wins
    back what pruning lost; --finetune-epochs 0 keeps the bare pruned model."""
    scores = {}
    for name, extra in (("default", ()), ("bare", ("--finetune-epochs", "0"))):
        run = shutil.copytree(trained(*MLP_RUN), tmp_path / name)
        cli("dlrun-compress", run, "--prune", "0.75", "--no-half", "--no-onnx", "--quantize", "", *extra, check=True)
        pruned = json.loads((run / "compress.json").read_text())["variants"][1]
        assert pruned["name"] == "pruned-flops-0.75"
        scores[name] = (pruned["finetune_epochs"], pruned["test/acc"])
    assert scores["default"][0] == 10 and scores["bare"][0] == 0
    assert scores["default"][1] > scores["bare"][1], scores


@pytest.mark.slow
def test_the_installed_command_refuses_a_bad_option(tmp_path):
    """The console script itself: its exit status and its one line on stderr."""
    bad = subprocess.run([COMPRESS, str(tmp_path), "--prune", "1.5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "dlrun-compress: error: --prune 1.5 is invalid: each must be in (0, 1)"
    assert list(tmp_path.iterdir()) == []


def test_taylor_importance_and_steps_with_finetuning():
    torch.manual_seed(0)
    cnn = model_of("model=cnn", "model.channels=[16,32]", "model.hidden=64").eval()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    graded, tuned = [], []

    def grad_fn(m):
        graded.append(1)
        torch.nn.functional.cross_entropy(m(x), y).backward()

    before = cost_of(cnn, "params", (1, 8, 8))
    pruned = structured(cnn, (1, 8, 8), 0.5, "params", "global", "taylor", steps=2,
                        finetune=lambda m: tuned.append(cost_of(m, "params", (1, 8, 8))), grad_fn=grad_fn)
    assert graded and all(p.grad is None for p in pruned.parameters())  # gradients used, then dropped
    assert len(tuned) == 2 and 0.70 <= tuned[0] / before <= 0.75 and 0.45 <= tuned[1] / before <= 0.5
    assert cost_of(pruned, "params", (1, 8, 8)) == tuned[1]


def test_a_1d_network_is_quantised_as_the_same_network_in_2d():
    """Inductor cannot lower 1-D int8 convolutions (torch 2.14), so static int8 takes the 1-D CNN as
    2-D over a height-1 input: the same outputs; a network that works on the length itself stays 1-D."""
    from dlrun.compress.quantize import Rows2d, as_2d

    torch.manual_seed(0)
    cnn = model_of("model=cnn", "model.channels=[8,8]", "model.kernel_size=5", "model.pool=max",
                "model.batch_norm=true", "model.hidden=16", shape=(1, 40)).eval()
    x = torch.randn(16, 1, 40)
    flat = as_2d(cnn, x)
    assert isinstance(flat, Rows2d) and not any(isinstance(m, torch.nn.Conv1d) for m in flat.modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in flat.modules())
    with torch.no_grad():
        assert torch.allclose(flat(x), cnn(x), atol=1e-6)

    class LastStep(torch.nn.Module):
        def forward(self, x):
            return x[..., -1]

    on_length = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), LastStep()).eval()
    assert as_2d(on_length, x) is on_length


@pytest.mark.slow  # inductor compiles C++ in processes of its own (the compiler, its compile workers)
def test_static_int8_of_a_1d_cnn_runs_under_inductor():
    import torch._inductor.config as inductor

    from dlrun.compress.quantize import compiled, static_int8

    torch.manual_seed(0)
    cnn = model_of("model=cnn", "model.channels=[8,8]", "model.kernel_size=5", "model.pool=max",
                "model.batch_norm=false", "model.hidden=0", shape=(1, 40)).eval()
    batches = [torch.randn(32, 1, 40) for _ in range(4)]
    quantised = static_int8(cnn, batches, batches[0])
    with inductor.patch(freezing=True), torch.no_grad():
        fast = compiled(quantised, batches[0])
        out = fast(batches[1])
    with torch.no_grad():
        reference = cnn(batches[1])
    assert out.shape == reference.shape and (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
