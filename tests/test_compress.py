"""Post-training optimisation: pruning leaves the stated sparsity, int8 and half precision keep the accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlrun.data import build_data, load_digits
from dlrun.models import MLP
from dlrun.tools.compress import compress, load_variant, prune_globally, sparsity_of
from dlrun.run import run
from dlrun.train import evaluate


def test_global_pruning_reaches_the_sparsity():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=[32, 32], batch_norm=False)
    targets = prune_globally(model, 0.75)
    assert sparsity_of(targets) == pytest.approx(0.75, abs=1e-3)
    # global: the layers end up with different sparsities, the smallest weights of all going first
    per_layer = [float((m.weight == 0).float().mean()) for m, _ in targets]
    assert len(set(round(p, 3) for p in per_layer)) > 1


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from dlrun.cli import config_dir
    from dlrun.config.schema import register_configs

    register_configs()
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=config_dir()):
        cfg = compose("config", overrides=["model=mlp", "model.hidden=[64]", "trainer.epochs=8", "device=cpu"])
    run(cfg, run_dir=run_dir)
    return run_dir


def test_variants_are_measured_saved_and_loadable(trained_run):
    result = compress(trained_run, [0.5, 0.9], finetune_epochs=1, half=True, quantize=True, log=lambda s: None)
    names = [v["name"] for v in result["variants"]]
    assert names == ["original", "pruned-0.5", "pruned-0.9", "int8-dynamic", "bf16", "fp16"]
    by = {v["name"]: v for v in result["variants"]}
    base = by["original"]["test/acc"]
    assert base > 0.9
    assert by["pruned-0.5"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert by["pruned-0.9"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert by["pruned-0.9"]["compressed_mb"] < by["original"]["compressed_mb"]
    assert abs(by["int8-dynamic"]["delta"]) <= 0.02  # int8 keeps the accuracy on digits
    assert by["int8-dynamic"]["size_mb"] < 0.5 * by["original"]["size_mb"]
    assert abs(by["bf16"]["delta"]) <= 0.02 and abs(by["fp16"]["delta"]) <= 0.01
    assert json.loads((trained_run / "compress.json").read_text())["variants"][0]["name"] == "original"

    data = build_data(load_digits(0.2, 0.1, 0), torch.device("cpu"))
    for name in ("pruned-0.9", "int8-dynamic", "bf16"):
        model = load_variant(trained_run / "variants" / f"{name}.pt")  # weights_only, like any checkpoint
        assert evaluate(model, data.splits["test"], 512)["acc"] == pytest.approx(by[name]["test/acc"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dlrun-compress", "dlrun-optimize"])  # dlrun-optimize: the earlier name
def test_the_command(trained_run, name):
    command = str(Path(sys.executable).with_name(name))
    out = subprocess.run([command, str(trained_run), "--sparsity", "0.6", "--no-half"], capture_output=True,
                         text=True, check=True).stdout
    assert "pruned-0.6" in out and "int8-dynamic" in out and "bf16" not in out
    bad = subprocess.run([command, str(trained_run), "--sparsity", "1.5"], capture_output=True, text=True)
    assert bad.returncode != 0 and f"{name}: error: --sparsity '1.5': each must be in [0, 1)" in bad.stderr
