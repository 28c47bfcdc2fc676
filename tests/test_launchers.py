"""Sweeps on real Hydra launchers: joblib in parallel, submitit's local executor (with a real
requeue), and the Slurm preset up to the generated sbatch script."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DLRUN, read_metrics, read_summary
from omegaconf import OmegaConf

from dlrun.config.schema import cpu_share

pytestmark = pytest.mark.slow


def sweep_jobs(sweep: Path) -> list[dict]:
    return json.loads((sweep / "sweep_summary.json").read_text())["jobs"]


def lr_overrides(jobs: list[dict]) -> list[list[str]]:
    return [[o for o in job["overrides"] if o.startswith("optimizer.lr=")] for job in jobs]


def test_joblib_sweep_runs_jobs_with_a_share_of_the_threads(dlrun_cli, tmp_path):
    proc = dlrun_cli("-m", "launcher=local_parallel", "hydra.launcher.n_jobs=2", "optimizer.lr=1e-3,1e-2",
                     "trainer.epochs=1", "device=cpu", "hydra.sweep.dir=sweep")
    assert proc.returncode == 0, proc.stderr
    assert lr_overrides(sweep_jobs(tmp_path / "sweep")) == [["optimizer.lr=0.001"], ["optimizer.lr=0.01"]]
    for job in ("0", "1"):
        summary = read_summary(tmp_path / "sweep" / job)
        assert summary["status"] == "completed" and summary["threads"] == cpu_share(2)


def test_submitit_local_sweep_runs_each_job_as_a_submitit_job(dlrun_cli, tmp_path):
    proc = dlrun_cli("-m", "launcher=submitit_local", "optimizer.lr=1e-3,1e-2", "trainer.epochs=1",
                     "device=cpu", "hydra.sweep.dir=sweep")
    assert proc.returncode == 0, proc.stderr
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


def test_a_preempted_submitit_job_is_requeued_and_resumes_from_its_checkpoint(dlrun_cli, data_dir, tmp_path):
    args = ["trainer.epochs=8", "device=cpu", "model.channels=[8,16]", "model.hidden=32"]
    env = {**os.environ, "DLRUN_DATA_DIR": str(data_dir)}
    sweep = subprocess.Popen([DLRUN, "-m", "launcher=submitit_local", "hydra.sweep.dir=sweep", *args], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        last = tmp_path / "sweep" / "0" / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 120
        while not last.is_file() and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        tasks = submitit_tasks(tmp_path)
        assert tasks, "the submitit job was not found"
        for pid in tasks:  # what Slurm sends before a time limit or a preemption
            os.kill(pid, signal.SIGUSR2)
        out, _ = sweep.communicate(timeout=240)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, out
    job = tmp_path / "sweep" / "0"
    summary = read_summary(job)
    assert summary["status"] == "completed" and summary["epochs"] == 8
    assert len(summary["resumed"]) == 1 and summary["resumed"][0]["epoch"] >= 1  # continued, not restarted
    assert [m["epoch"] for m in read_metrics(job)] == list(range(1, 9))
    # and it ends exactly where an uninterrupted run does
    dlrun_cli("hydra.run.dir=straight", *args, check=True)
    assert summary["final"] == pytest.approx(read_summary(tmp_path / "straight")["final"])


def test_slurm_preset_generates_the_sbatch_script(dlrun_cli, tmp_path):
    """No cluster here: a stand-in `sbatch` keeps the script submitit generated and refuses the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_RECORD"\necho "sbatch: test double" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that srun exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    record = tmp_path / "job.sbatch"
    env_path = f"{bin_dir}:{os.environ['PATH']}"
    proc = subprocess.run(
        [DLRUN, "-m", "launcher=slurm", "hydra.sweep.dir=sweep", "hydra.launcher.partition=gpu",
         "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=240", "hydra.launcher.mem_gb=64",
         "hydra.launcher.cpus_per_task=12", "optimizer=sgd,adam"],
        cwd=tmp_path, env={**os.environ, "PATH": env_path, "SBATCH_RECORD": str(record)},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "dlrun: error: Slurm did not take the jobs: sbatch: test double"
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


def test_slurm_without_slurm_is_a_clear_error(tmp_path):
    bin_dir = Path(sys.executable).parent  # dlrun's own, without any Slurm tools
    proc = subprocess.run([DLRUN, "-m", "launcher=slurm", "optimizer=sgd,adam"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert proc.returncode == 1
    assert "launcher=slurm submits with Slurm's sbatch, which is not on PATH" in proc.stderr
    assert "Traceback" not in proc.stderr
