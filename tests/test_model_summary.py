"""trainer.model_summary: the model layer by layer (torchinfo's output shapes; parameters and FLOPs per layer),
printed before the first epoch and written to model_summary.txt; it changes nothing in the training."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import CPU, model_of, read_metrics, read_summary
from dlrun.cost import flops_per_sample, layer_table


def rows(table: str) -> list[list[str]]:
    """The layer rows of a table (without the header, rules and total), split into columns."""
    lines = table.splitlines()
    return [re.split(r"\s{2,}", line.strip()) for line in lines[2:lines.index(lines[1], 2)]]


@pytest.mark.parametrize("overrides, shape", [(("model=cnn",), (1, 8, 8)), (("model=rnn",), (8, 8)),
                                              (("model=transformer",), (1, 8, 8)), (("model=resnet",), (1, 8, 8))])
def test_the_layers_add_up_to_the_model(overrides, shape):
    model = model_of(*overrides, shape=shape)
    table = layer_table(model, shape, torch.device("cpu"), depth=1)
    top = rows(table)
    total = table.splitlines()[-1].split()
    parameters = sum(p.numel() for p in model.parameters())
    assert total == ["total", f"{parameters:,}", f"{flops_per_sample(model, shape, torch.device('cpu')):,}"]
    assert top[0][:3] == [type(model).__name__, type(model).__name__, "10"]  # the whole model: 10 outputs
    children = top[1:]
    assert [c[0] for c in children] == [name for name, _ in model.named_children()]
    # the model's own parameters (a transformer's positions) are in the total, not in a child
    own = sum(p.numel() for p in model.parameters(recurse=False))
    assert sum(int(c[-2].replace(",", "")) for c in children) + own == parameters


def test_depth_shows_nested_layers_with_their_output_shapes():
    model = model_of("model=cnn")
    shallow, deep = (rows(layer_table(model, (1, 8, 8), torch.device("cpu"), depth=d)) for d in (1, 3))
    assert len(shallow) == 3 and len(deep) == 1 + len(list(model.modules())) - 1
    first_conv = next(r for r in deep if r[1] == "Conv2d")
    # 32 channels of 8x8 (padding keeps the size); 288 weights, 32x8x8 outputs of 9 multiply-adds each
    assert first_conv == ["features.0", "Conv2d", "32x8x8", "288", f"{32 * 64 * 9 * 2:,}"]


def test_a_run_prints_and_keeps_its_summary_and_trains_the_same_without_it(cli, tmp_path):
    ran = cli("dlrun", "hydra.run.dir=on", "trainer.epochs=1", "trainer.model_summary_depth=1", *CPU, check=True)
    cli("dlrun", "hydra.run.dir=off", "trainer.epochs=1", "trainer.model_summary=false", *CPU, check=True)
    kept = (tmp_path / "on" / "model_summary.txt").read_text()
    lines = ran.stdout.splitlines()
    assert lines[2:2 + len(kept.splitlines())] == kept.splitlines()  # after the start line and the folder
    assert kept.splitlines()[-1].split() == ["total", "53,098", f"{read_summary(tmp_path / 'on')['cost']['flops_per_sample']:,}"]
    assert not (tmp_path / "off" / "model_summary.txt").exists()
    on, off = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    assert [m["train/loss"] for m in on] == [m["train/loss"] for m in off]
    assert [m["val/loss"] for m in on] == [m["val/loss"] for m in off]


def test_a_depth_below_one_is_refused(cli, tmp_path):
    ran = cli("dlrun", "trainer.model_summary_depth=0", *CPU)
    assert ran.returncode != 0
    assert "trainer.model_summary_depth=0 is invalid: must be >= 1" in ran.stderr
