"""Interruption, exact resume, non-finite losses, failing sweep jobs and bad input, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import DLRUN, read_metrics, read_summary

pytestmark = pytest.mark.slow

TIMING = {"seconds", "samples_per_s"}
# Dropout (the CNN default), a per-batch scheduler and small batches: 79 steps per epoch.
RUN = ["trainer.epochs=12", "trainer.batch_size=16", "scheduler=cosine", "trainer.warmup_epochs=1",
       "optimizer=momentum", "optimizer.lr=0.02", "device=cpu", "device.threads=1"]


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    """The uninterrupted run everything is compared with."""
    cwd = tmp_path_factory.mktemp("straight")
    env = {**os.environ, "DLRUN_DATA_DIR": str(data_dir)}
    subprocess.run([DLRUN, "hydra.run.dir=run", *RUN], cwd=cwd, env=env, check=True, capture_output=True)
    return cwd / "run"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_then_resume_matches_the_uninterrupted_run(straight, dlrun_cli, tmp_path, data_dir, sig):
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
    assert 1 <= stopped["epoch"] < 12
    assert len(read_metrics(run)) == stopped["epoch"]

    proc = dlrun_cli(f"resume={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(run)
    assert summary["status"] == "completed"
    assert summary["resumed"][0]["step"] == stopped["step"]
    # the same folder, no duplicate or missing epochs, and exactly the uninterrupted run's numbers
    assert [m["epoch"] for m in read_metrics(run)] == list(range(1, 13))
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(straight))
    assert summary["final"] == read_summary(straight)["final"]
    for name in ("last.pt", "best.pt"):
        got, want = weights(run / "checkpoints" / name), weights(straight / "checkpoints" / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    # Hydra's record of the original command is untouched; the resume has its own
    assert "trainer.epochs=12" in (run / ".hydra" / "overrides.yaml").read_text()
    assert list((run / ".hydra").glob("resume-*/overrides.yaml"))


def test_nonfinite_loss_keeps_the_last_good_checkpoint(dlrun_cli, tmp_path):
    # lr 0.01 for epoch 1, then 0.01 * 1e6: the loss blows up in epoch 2
    proc = dlrun_cli("hydra.run.dir=run", "optimizer=sgd", "optimizer.lr=0.01", "scheduler=step",
                     "scheduler.step_epochs=1", "scheduler.gamma=1e6", "model.batch_norm=false", "trainer.epochs=3",
                     "device=cpu")
    assert proc.returncode == 1
    assert "the training loss became" in proc.stderr and "(epoch 2)" in proc.stderr
    assert "Traceback" not in proc.stderr
    run = tmp_path / "run"
    summary = read_summary(run)
    assert summary["status"] == "failed" and "NonFiniteLoss" in summary["error"]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 1 and last["state"]["batch"] == 0
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert [m["epoch"] for m in read_metrics(run)] == [1]


def test_nonfinite_skip_mode_finishes(dlrun_cli, tmp_path):
    proc = dlrun_cli("hydra.run.dir=run", "optimizer=sgd", "optimizer.lr=1e4", "trainer.epochs=1",
                     "trainer.on_nonfinite=skip", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert read_metrics(tmp_path / "run")[0]["skipped_batches"] >= 1


def test_a_failing_job_does_not_stop_the_sweep(dlrun_cli, tmp_path):
    proc = dlrun_cli("-m", "optimizer=sgd", "optimizer.lr=1e4,0.05", "trainer.epochs=2", "device=cpu")
    assert proc.returncode == 1
    assert "1 of 2 jobs did not complete: #0 (optimizer=sgd optimizer.lr=10000.0" in proc.stderr
    (sweep,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert [(j["job"], j["status"]) for j in jobs] == [("0", "failed"), ("1", "completed")]
    assert "NonFiniteLoss" in jobs[0]["error"] and jobs[1]["monitor_value"] > 0.5
    assert read_summary(sweep / "1")["status"] == "completed"
    assert "sweep:" in proc.stdout and "failed" in proc.stdout


def test_successful_sweep_exits_zero_with_a_summary(dlrun_cli, tmp_path):
    proc = dlrun_cli("-m", "model.hidden=16,32", "trainer.epochs=1", "device=cpu")
    assert proc.returncode == 0, proc.stderr
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
def test_bad_input_is_rejected_with_the_key_named(dlrun_cli, tmp_path, args, message):
    (tmp_path / "afile").write_text("a file where a folder is expected")
    proc = dlrun_cli(*args)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_refuses_other_overrides_and_corrupt_checkpoints(dlrun_cli, tmp_path):
    dlrun_cli("hydra.run.dir=run", "trainer.epochs=1", "device=cpu", check=True)
    proc = dlrun_cli("resume=run", "optimizer.lr=0.5")
    assert proc.returncode == 1 and ("drop the other overrides (optimizer.lr=0.5); to train for more epochs add "
                                     "trainer.epochs=N") in proc.stderr
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"\x00garbage")
    proc = dlrun_cli("resume=run")
    assert proc.returncode == 1 and "cannot be loaded safely" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_with_more_epochs_trains_on_as_if_planned(dlrun_cli, tmp_path):
    dlrun_cli("hydra.run.dir=short", "trainer.epochs=2", "device=cpu", "device.threads=1", check=True)
    dlrun_cli("hydra.run.dir=long", "trainer.epochs=4", "device=cpu", "device.threads=1", check=True)
    proc = dlrun_cli("resume=short", "trainer.epochs=4")
    assert proc.returncode == 0, proc.stderr
    short, long = read_summary(tmp_path / "short"), read_summary(tmp_path / "long")
    assert short["epochs"] == 4 and short["final"] == long["final"] and short["best"] == long["best"]
    assert without_timing(read_metrics(tmp_path / "short")) == without_timing(read_metrics(tmp_path / "long"))
    assert dlrun_cli("resume=short", "trainer.epochs=1").returncode == 1  # fewer than it has done
