"""trainer.lr_find: the learning-rate range test before training. Its suggestion on a known problem, its curve,
the state it leaves (the run after it equals a run without it), the lr it applies, resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import CPU, read_metrics, read_summary
from dlrun.lr_find import SKIP_BEGIN, suggest

QUIET = ("trainer.model_summary=false", *CPU)


def test_the_suggestion_is_the_steepest_descent_after_the_first_points():
    lrs = [10 ** (-7 + 7 * i / 99) for i in range(100)]
    # a loss that falls fastest around lr = 1e-3 (index 56.6) against log(lr), then rises
    losses = [2 - math.tanh((math.log10(lr) + 3) * 2) + max(0.0, math.log10(lr) + 1) ** 2 for lr in lrs]
    assert abs(math.log10(suggest(lrs, losses)) + 3) < 0.05
    noisy = losses.copy()
    noisy[2] -= 5  # a drop among the first points is noise, not the suggestion
    assert suggest(lrs, noisy) == suggest(lrs, losses)
    assert suggest(lrs[:SKIP_BEGIN + 2], losses[:SKIP_BEGIN + 2]) is None  # too short to tell


@pytest.mark.parametrize("optimizer, band", [("adam", (1e-4, 0.05)), ("sgd", (0.01, 1.0))])
def test_on_digits_the_suggestion_lies_where_the_optimizer_is_known_to_train(cli, tmp_path, optimizer, band):
    """Adam trains the digits CNN well near 1e-3, plain SGD near 0.1 (the usual defaults); the suggestion,
    as steepest descent, lies below the lr where the loss is lowest, within the optimizer's band."""
    cli("dlrun", "hydra.run.dir=run", f"optimizer={optimizer}", "trainer.lr_find=true", "trainer.epochs=1", *QUIET,
        check=True)
    found = read_summary(tmp_path / "run")["lr_find"]
    assert band[0] < found["suggestion"] < band[1], found
    assert found["steps"] == 100 and not found["diverged"] and found["applied"]
    assert (tmp_path / "run" / "plots" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_after_the_test_is_the_run_with_the_suggested_lr(cli, tmp_path):
    """The test leaves the model, the optimizer and the RNGs as they were: training on after it (with its lr
    applied) equals a run started with optimizer.lr=<the suggestion>, and without applying it, a run without it."""
    common = ("trainer.epochs=2", "model.dropout=0.2", *QUIET)  # dropout: the RNG must be restored too
    cli("dlrun", "hydra.run.dir=found", "trainer.lr_find=true", *common, check=True)
    lr = read_summary(tmp_path / "found")["lr_find"]["suggestion"]
    cli("dlrun", "hydra.run.dir=given", f"optimizer.lr={lr!r}", *common, check=True)
    cli("dlrun", "hydra.run.dir=probed", "trainer.lr_find=true", "trainer.lr_find_apply=false", *common, check=True)
    cli("dlrun", "hydra.run.dir=plain", *common, check=True)
    metrics = {run: [{k: v for k, v in m.items() if "second" not in k and "samples_per_s" not in k}
                     for m in read_metrics(tmp_path / run)] for run in ("found", "given", "probed", "plain")}
    assert metrics["found"] == metrics["given"] and metrics["found"][0]["lr"] == lr
    assert metrics["probed"] == metrics["plain"] and metrics["plain"][0]["lr"] == 1e-3
    weights = {run: torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)
               for run in ("found", "given")}
    assert all(torch.equal(a, weights["given"]["model"][k]) for k, a in weights["found"]["model"].items())
    assert weights["found"]["config"]["optimizer"]["lr"] == lr  # a resumed run goes on with it
    assert not read_summary(tmp_path / "probed")["lr_find"]["applied"]


def test_a_resumed_run_keeps_the_lr_it_found_without_testing_again(cli, tmp_path):
    cli("dlrun", "hydra.run.dir=run", "trainer.lr_find=true", "trainer.epochs=1", *QUIET, check=True)
    png = tmp_path / "run" / "plots" / "lr_find.png"
    before, found = png.stat().st_mtime_ns, read_summary(tmp_path / "run")["lr_find"]
    cli("dlrun", f"resume={tmp_path / 'run'}", "trainer.epochs=2", check=True)
    assert png.stat().st_mtime_ns == before and read_summary(tmp_path / "run")["lr_find"] == found
    assert [m["lr"] for m in read_metrics(tmp_path / "run")] == [found["suggestion"]] * 2


@pytest.mark.parametrize("override, said", [
    ("trainer.lr_find_steps=10", "trainer.lr_find_steps=10 is invalid: must be >= 20"),
    ("trainer.lr_find_min_lr=2.0", "trainer.lr_find_min_lr=2.0 is invalid: must be > 0 and below "
                                   "trainer.lr_find_max_lr=1.0"),
    ("trainer.devices=2", "trainer.lr_find=True is invalid: runs in one process"),
])
def test_bad_settings_are_one_line(cli, tmp_path, override, said):
    ran = cli("dlrun", "trainer.lr_find=true", override, *CPU)
    assert ran.returncode != 0 and said in ran.stderr, ran.stderr
    assert not (tmp_path / "outputs").exists()  # refused before the run folder
