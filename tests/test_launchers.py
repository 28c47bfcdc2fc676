"""Sweeps on real Hydra launchers: joblib in parallel, submitit's local executor (with a real
requeue), and the Slurm preset up to the generated sbatch script.

The sweeps are launched in this process (`cli`); their jobs run in the launchers' own worker
processes (those tests are slow). The Slurm tests stop at submission: a stand-in `sbatch` or none."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import CPU, read_metrics, read_summary
from omegaconf import OmegaConf

from dlrun.config.schema import cpu_share


def sweep_jobs(sweep: Path) -> list[dict]:
    return json.loads((sweep / "sweep_summary.json").read_text())["jobs"]


def lr_overrides(jobs: list[dict]) -> list[list[str]]:
    return [[o for o in job["overrides"] if o.startswith("optimizer.lr=")] for job in jobs]


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_with_a_share_of_the_threads(cli, tmp_path):
    # An absolute sweep folder: joblib may reuse worker processes that another test started elsewhere.
    sweep = tmp_path / "sweep"
    ran = cli("dlrun", "-m", "launcher=local_parallel", "hydra.launcher.n_jobs=2", "optimizer.lr=1e-3,1e-2",
              "trainer.epochs=1", "device=cpu", f"hydra.sweep.dir={sweep}")
    assert ran.returncode == 0, ran.stderr
    assert lr_overrides(sweep_jobs(sweep)) == [["optimizer.lr=0.001"], ["optimizer.lr=0.01"]]
    for job in ("0", "1"):
        summary = read_summary(sweep / job)
        assert summary["status"] == "completed" and summary["threads"] == cpu_share(2)


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_as_a_submitit_job(cli, tmp_path):
    ran = cli("dlrun", "-m", "launcher=submitit_local", "optimizer.lr=1e-3,1e-2", "trainer.epochs=1", *CPU,
              "hydra.sweep.dir=sweep")
    assert ran.returncode == 0, ran.stderr
    sweep = tmp_path / "sweep"
    jobs = sweep_jobs(sweep)
    assert lr_overrides(jobs) == [["optimizer.lr=0.001"], ["optimizer.lr=0.01"]]
    assert all(job["status"] == "completed" and job["monitor_value"] > 0.5 for job in jobs)
    # submitit ran them: one folder per job with its logs and pickled result
    results = sorted(sweep.glob(".submitit/*/*_0_result.pkl"))
    assert len(results) == 2


def submitit_tasks(cwd: Path) -> list[int]:
    """Processes running a submitit job started from `cwd`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"submitit.core._submit" in argv and Path(os.readlink(proc / "cwd")) == cwd:
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_resumes_from_its_checkpoint(cli, tmp_path, trained):
    args = ["trainer.epochs=8", *CPU, "model.channels=[8,16]", "model.hidden=32"]
    last = tmp_path / "sweep" / "0" / "checkpoints" / "last.pt"
    swept, preempted = threading.Event(), []

    def preempt() -> None:
        """Once the job has a checkpoint, what Slurm sends before a time limit or a preemption."""
        deadline = time.monotonic() + 120
        while not last.is_file() and not swept.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in submitit_tasks(tmp_path):
            os.kill(pid, signal.SIGUSR2)
            preempted.append(pid)

    watcher = threading.Thread(target=preempt)  # the sweep runs here meanwhile
    watcher.start()
    try:
        ran = cli("dlrun", "-m", "launcher=submitit_local", "hydra.sweep.dir=sweep", *args)
    finally:
        swept.set()
        watcher.join()
    assert preempted, "the submitit job was not found"
    assert ran.returncode == 0, ran.stdout + ran.stderr
    job = tmp_path / "sweep" / "0"
    summary = read_summary(job)
    assert summary["status"] == "completed" and summary["epochs"] == 8
    assert len(summary["resumed"]) == 1 and summary["resumed"][0]["epoch"] >= 1  # continued, not restarted
    assert [m["epoch"] for m in read_metrics(job)] == list(range(1, 9))
    # and it ends exactly where an uninterrupted run does
    assert summary["final"] == pytest.approx(read_summary(trained(*args))["final"])


@pytest.mark.slow  # submitit runs the stand-in sbatch script
def test_slurm_preset_generates_the_sbatch_script(cli, tmp_path, monkeypatch):
    """No cluster here: a stand-in `sbatch` keeps the script submitit generated and refuses the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_RECORD"\necho "sbatch: test double" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that srun exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    record = tmp_path / "job.sbatch"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_RECORD", str(record))
    ran = cli("dlrun", "-m", "launcher=slurm", "hydra.sweep.dir=sweep", "hydra.launcher.partition=gpu",
              "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=240", "hydra.launcher.mem_gb=64",
              "hydra.launcher.cpus_per_task=12", "optimizer=sgd,adam")
    assert ran.returncode == 1, ran.stderr
    assert ran.stderr.strip().splitlines()[-1] == "dlrun: error: Slurm did not take the jobs: sbatch: test double", ran.stderr
    script = record.read_text()
    for line in ("--partition=gpu", "--gpus-per-node=2", "--time=240", "--mem=64GB", "--cpus-per-task=12",
                 "--array=0-1%2", "--signal=USR2@120", "--job-name=dlrun"):
        assert f"#SBATCH {line}\n" in script
    assert "-m submitit.core._submit" in script
    # Each job pickled for the cluster: dlrun's launcher (which resumes requeued jobs), with 3 requeues
    submissions = [pickle.loads(p.read_bytes()) for p in (tmp_path / "sweep" / ".submitit").glob("*.pkl")]
    assert sorted(s.args[0][-1] for s in submissions) == ["optimizer=adam", "optimizer=sgd"]
    for submission in submissions:
        assert type(submission.function).__qualname__ == "SlurmLauncher"
        assert type(submission.function).__module__ == "dlrun.hydra_ext.launchers"
        assert submission._timeout_countdown == 3
        # the job's threads follow the CPUs it asks for
        device = OmegaConf.to_container(submission.function.config.device)  # unresolved
        assert device["threads"] == "${hydra:launcher.cpus_per_task}"


def test_slurm_without_slurm_is_a_clear_error(cli, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # dlrun's own only: this machine may have Slurm
    ran = cli("dlrun", "-m", "launcher=slurm", "optimizer=sgd,adam")
    assert ran.returncode == 1
    assert "launcher=slurm submits with Slurm's sbatch, which is not on PATH" in ran.stderr
    assert "Traceback" not in ran.stderr
