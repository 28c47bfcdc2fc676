"""trainer.swa_start (stochastic weight averaging) and trainer.save_top_k: the averaged weights equal a hand-computed
average of the epochs' weights, batch norm recomputed on the training data; the k best epochs are kept; both
resume exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch.optim.swa_utils import update_bn

from conftest import CPU, read_metrics, read_summary
from dlrun.checkpoint import load_model
from dlrun.data import build_dataset
from dlrun.train import evaluate

QUIET = ("scheduler=none", "trainer.model_summary=false", *CPU)


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_swa_is_the_average_of_the_epochs_weights_with_batch_norm_recomputed(cli, tmp_path):
    # no dropout: batch norm's statistics are recomputed in training mode, where dropout would draw from the RNG
    nets = ("model.dropout=0", "model.head_dropout=0", *QUIET)
    cli("dlrun", "hydra.run.dir=swa", "trainer.epochs=4", "trainer.swa_start=2", *nets, check=True)
    for epochs in (2, 3, 4):  # the same trajectory, stopped after each epoch that is averaged
        cli("dlrun", f"hydra.run.dir=e{epochs}", f"trainer.epochs={epochs}", *nets, check=True)
    assert all(torch.equal(v, weights(tmp_path / "e4/checkpoints/last.pt")[k])  # averaging leaves training alone
               for k, v in weights(tmp_path / "swa/checkpoints/last.pt").items())
    averaged = weights(tmp_path / "swa/checkpoints/swa.pt")
    model, cfg, _ = load_model(tmp_path / "e4")
    for name, _ in model.named_parameters():
        by_hand = sum(weights(tmp_path / f"e{e}/checkpoints/last.pt")[name] for e in (2, 3, 4)) / 3
        torch.testing.assert_close(averaged[name], by_hand, rtol=0, atol=1e-6)
    # batch norm: the statistics of the averaged weights over the training split, recomputed from scratch
    model.load_state_dict({**model.state_dict(), **{n: averaged[n] for n, _ in model.named_parameters()}})
    train = build_dataset(cfg.dataset, torch.device("cpu")).splits["train"]
    update_bn(train.batches(cfg.trainer.eval_batch_size), model)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(averaged[name], buffer)
    summary = read_summary(tmp_path / "swa")
    assert summary["swa"]["averaged_epochs"] == 3 and summary["swa"]["start"] == 2
    test = build_dataset(cfg.dataset, torch.device("cpu")).splits["test"]
    model.eval()
    assert evaluate(model, test, 128)["acc"] == summary["swa"]["test/acc"]  # swa.pt is what was scored


def test_the_k_best_epochs_are_kept_and_each_file_holds_its_epochs_weights(cli, tmp_path):
    cli("dlrun", "hydra.run.dir=run", "trainer.epochs=6", "trainer.save_top_k=3", *QUIET, check=True)
    records = read_metrics(tmp_path / "run")
    ranked = sorted(records, key=lambda r: (-r["val/acc"], -r["epoch"]))[:3]  # ties: the later epoch
    files = sorted((tmp_path / "run/checkpoints/top").iterdir())
    assert [f.name for f in files] == [f"epoch-{r['epoch']:04d}.pt" for r in sorted(ranked, key=lambda r: r["epoch"])]
    assert read_summary(tmp_path / "run")["top_k"] == [{"epoch": r["epoch"], "val/acc": r["val/acc"]} for r in ranked]
    for record in ranked:
        model, cfg, _ = load_model(tmp_path / f"run/checkpoints/top/epoch-{record['epoch']:04d}.pt")
        val = build_dataset(cfg.dataset, torch.device("cpu")).splits["val"]
        assert evaluate(model, val, cfg.trainer.eval_batch_size)["acc"] == record["val/acc"]


def test_swa_and_top_k_resume_to_the_uninterrupted_result(cli, tmp_path):
    common = ("trainer.swa_start=2", "trainer.save_top_k=2", *QUIET)
    cli("dlrun", "hydra.run.dir=whole", "trainer.epochs=5", *common, check=True)
    cli("dlrun", "hydra.run.dir=cut", "trainer.epochs=3", *common, check=True)
    cli("dlrun", f"resume={tmp_path / 'cut'}", "trainer.epochs=5", check=True)
    whole, cut = (tmp_path / "whole/checkpoints", tmp_path / "cut/checkpoints")
    for name in ("swa.pt", "best.pt", *(p.name for p in (whole / "top").iterdir())):
        path = name if name.endswith(("swa.pt", "best.pt")) else f"top/{name}"
        assert all(torch.equal(v, weights(cut / path)[k]) for k, v in weights(whole / path).items()), name
    assert sorted(p.name for p in (whole / "top").iterdir()) == sorted(p.name for p in (cut / "top").iterdir())
    for key in ("swa", "top_k"):
        assert read_summary(tmp_path / "whole")[key] == read_summary(tmp_path / "cut")[key]


@pytest.mark.parametrize("overrides, said", [
    (["trainer.swa_start=-1"], "trainer.swa_start=-1 is invalid: must be >= 0"),
    (["trainer.save_top_k=0"], "trainer.save_top_k=0 is invalid: must be >= 1"),
    (["trainer.save_top_k=2", "trainer.save_checkpoints=false"],
     "trainer.save_top_k=2 is invalid: keeps checkpoints: it needs trainer.save_checkpoints=true"),
])
def test_bad_settings_are_one_line(cli, tmp_path, overrides, said):
    ran = cli("dlrun", *overrides, *CPU)
    assert ran.returncode != 0 and said in ran.stderr, ran.stderr
    assert not (tmp_path / "outputs").exists()
