"""Interruption, exact resume, non-finite losses, failing sweep jobs and bad input, through the CLI: a real
`dlrun` process where a signal stops it, the commands in this process (`cli`) for everything else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import CPU, DLRUN, read_metrics, read_summary

TIMING = {"seconds", "samples_per_s"}
# Dropout (the CNN default), a per-batch scheduler with warm-up and small batches: 79 steps per epoch. The
# signal is sent as soon as epoch 1's record appears, so it stops the run in epoch 2, well before its end.
EPOCHS = 4
RUN = (f"trainer.epochs={EPOCHS}", "trainer.batch_size=16", "scheduler=cosine", "trainer.warmup_epochs=1",
       "optimizer=momentum", "optimizer.lr=0.02", *CPU)


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_then_resume_matches_the_uninterrupted_run(trained, cli, tmp_path, data_dir, sig):
    straight = trained(*RUN)  # the uninterrupted run everything is compared with
    run = tmp_path / "run"
    env = {**os.environ, "DLRUN_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([DLRUN, f"hydra.run.dir={run}", *RUN], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 128 + sig, err
    assert f"stopped by {sig.name}" in err and f"dlrun resume={run}" in err and "Traceback" not in err
    summary = read_summary(run)
    assert summary["status"] == "interrupted"
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert 1 <= stopped["epoch"] < EPOCHS
    assert len(read_metrics(run)) == stopped["epoch"]

    ran = cli("dlrun", f"resume={run}")
    assert ran.returncode == 0, ran.stderr
    summary = read_summary(run)
    assert summary["status"] == "completed"
    assert summary["resumed"][0]["step"] == stopped["step"]
    # the same folder, no duplicate or missing epochs, and exactly the uninterrupted run's numbers
    assert [m["epoch"] for m in read_metrics(run)] == list(range(1, EPOCHS + 1))
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(straight))
    assert summary["final"] == read_summary(straight)["final"]
    for name in ("last.pt", "best.pt"):
        got, want = weights(run / "checkpoints" / name), weights(straight / "checkpoints" / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    # Hydra's record of the original command is untouched; the resume has its own
    assert f"trainer.epochs={EPOCHS}" in (run / ".hydra" / "overrides.yaml").read_text()
    assert list((run / ".hydra").glob("resume-*/overrides.yaml"))


def test_nonfinite_loss_keeps_the_last_good_checkpoint(cli, tmp_path):
    # lr 0.01 for epoch 1, then 0.01 * 1e6: the loss blows up in epoch 2
    ran = cli("dlrun", "hydra.run.dir=run", "optimizer=sgd", "optimizer.lr=0.01", "scheduler=step",
              "scheduler.step_epochs=1", "scheduler.gamma=1e6", "model.batch_norm=false", "trainer.epochs=3", *CPU)
    assert ran.returncode == 1
    assert "the training loss became" in ran.stderr and "(epoch 2)" in ran.stderr
    assert "Traceback" not in ran.stderr
    run = tmp_path / "run"
    summary = read_summary(run)
    assert summary["status"] == "failed" and "NonFiniteLoss" in summary["error"]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 1 and last["state"]["batch"] == 0
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert [m["epoch"] for m in read_metrics(run)] == [1]


def test_nonfinite_skip_mode_finishes(cli, tmp_path):
    ran = cli("dlrun", "hydra.run.dir=run", "optimizer=sgd", "optimizer.lr=1e4", "trainer.epochs=1",
              "trainer.on_nonfinite=skip", *CPU)
    assert ran.returncode == 0, ran.stderr
    assert read_metrics(tmp_path / "run")[0]["skipped_batches"] >= 1


def test_a_failing_job_does_not_stop_the_sweep(cli, tmp_path):
    ran = cli("dlrun", "-m", "optimizer=sgd", "optimizer.lr=1e4,0.05", "trainer.epochs=2", *CPU)
    assert ran.returncode == 1
    assert "1 of 2 jobs did not complete: #0 (optimizer=sgd optimizer.lr=10000.0" in ran.stderr
    (sweep,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert [(j["job"], j["status"]) for j in jobs] == [("0", "failed"), ("1", "completed")]
    assert "NonFiniteLoss" in jobs[0]["error"] and jobs[1]["monitor_value"] > 0.5
    assert read_summary(sweep / "1")["status"] == "completed"
    assert "sweep:" in ran.stdout and "failed" in ran.stdout


def test_successful_sweep_exits_zero_with_a_summary(cli, tmp_path):
    ran = cli("dlrun", "-m", "model.hidden=16,32", "trainer.epochs=1", *CPU)
    assert ran.returncode == 0, ran.stderr
    (summary,) = list((tmp_path / "outputs" / "multirun").glob("*/*/sweep_summary.json"))
    jobs = json.loads(summary.read_text())["jobs"]
    assert [j["overrides"][0] for j in jobs] == ["model.hidden=16", "model.hidden=32"]
    assert all(j["status"] == "completed" and j["wall_time_s"] > 0 for j in jobs)


@pytest.mark.parametrize(
    "args,message",
    [
        (["trainer.batch_size=0"], "trainer.batch_size=0 is invalid: must be a positive integer"),
        (["trainer.epochs=-1"], "trainer.epochs=-1 is invalid: must be a positive integer"),
        (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 is invalid: must be > 0"),
        (["model.dropout=1.5"], "model.dropout=1.5 is invalid: must be in [0, 1)"),
        (["model.channels=[8,8,8,8]"], "model.channels=[8, 8, 8, 8] pools the input (1, 8, 8) below one element"),
        (["dataset=mnist1d", "dataset.data_dir=afile/data"], "dataset.data_dir='afile/data' is invalid"),
        (["hydra.run.dir=afile/run"], "hydra.run.dir=afile/run cannot be used as the output folder"),
        (["-m", "hydra.sweep.dir=afile/sweep"], "hydra.sweep.dir=afile/sweep cannot be used as the output folder"),
        (["resume=nowhere"], "resume=nowhere: no such run folder"),
    ],
)
def test_bad_input_is_rejected_with_the_key_named(cli, tmp_path, args, message):
    (tmp_path / "afile").write_text("a file where a folder is expected")
    ran = cli("dlrun", *args)
    assert ran.returncode == 1
    assert message in ran.stderr
    assert "Traceback" not in ran.stderr


def test_resume_refuses_other_overrides_and_corrupt_checkpoints(trained, cli, tmp_path):
    shutil.copytree(trained("trainer.epochs=1", *CPU), tmp_path / "run")
    ran = cli("dlrun", "resume=run", "optimizer.lr=0.5")
    assert ran.returncode == 1 and ("drop the other overrides (optimizer.lr=0.5); to train for more epochs add "
                                    "trainer.epochs=N") in ran.stderr
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"\x00garbage")
    ran = cli("dlrun", "resume=run")
    assert ran.returncode == 1 and "cannot be loaded safely" in ran.stderr and "Traceback" not in ran.stderr


def test_resume_with_more_epochs_trains_on_as_if_planned(trained, cli, tmp_path):
    # the session's shared 1- and 3-epoch digits CNNs
    shutil.copytree(trained("trainer.epochs=1", *CPU), tmp_path / "short")
    long = trained("trainer.epochs=3", *CPU)
    ran = cli("dlrun", "resume=short", "trainer.epochs=3")
    assert ran.returncode == 0, ran.stderr
    short, planned = read_summary(tmp_path / "short"), read_summary(long)
    assert short["epochs"] == 3 and short["final"] == planned["final"] and short["best"] == planned["best"]
    assert without_timing(read_metrics(tmp_path / "short")) == without_timing(read_metrics(long))
    assert cli("dlrun", "resume=short", "trainer.epochs=1").returncode == 1  # fewer than it has done
