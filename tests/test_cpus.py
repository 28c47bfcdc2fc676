"""The CPUs a process may use (affinity, cgroup quota, Slurm) and the OpenMP wait policy dlrun sets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import read_summary
from dlrun.cpus import _cgroup_quota, usable_cpus, wait_policy


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus=1.5
    assert _cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_quota(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_quota(tmp_path) is None


def test_usable_cpus_is_the_smallest_limit(tmp_path, monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert usable_cpus(tmp_path) == affinity  # no quota files: the affinity mask
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1  # half a CPU of quota: one thread
    (tmp_path / "cpu.max").write_text("max 100000\n")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert usable_cpus(tmp_path) == 1


def test_a_busy_machine_gets_a_passive_wait_policy():
    assert wait_policy(load=0.3, cpus=2) is None  # idle: OpenMP's default (spinning) is the fastest
    assert wait_policy(load=1.0, cpus=2) == "PASSIVE"
    assert wait_policy(load=7.5, cpus=16) is None and wait_policy(load=8.0, cpus=16) == "PASSIVE"


@pytest.mark.slow  # a new interpreter: this one imported dlrun long ago
def test_importing_dlrun_keeps_the_users_wait_policy():
    code = "import os, dlrun; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for policy in ("ACTIVE", "PASSIVE"):
        assert subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": policy},
                              capture_output=True, text=True, check=True).stdout.strip() == policy


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs (torch's default would take both)")
def test_a_run_takes_no_more_threads_than_its_slurm_allocation(data_dir, tmp_path):
    """Real processes: a run with device.threads=0 starts from torch's default, a new process's."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for name, extra in (("free", {}), ("slurm", {"SLURM_CPUS_PER_TASK": "1"})):
        proc = subprocess.run([sys.executable, "-m", "dlrun", f"hydra.run.dir={name}", "trainer.epochs=1", "device=cpu"],
                              cwd=tmp_path, env={**env, "DLRUN_DATA_DIR": str(data_dir), **extra}, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
    assert read_summary(tmp_path / "free")["threads"] == min(len(os.sched_getaffinity(0)), torch_default_threads())
    assert read_summary(tmp_path / "slurm")["threads"] == 1


def torch_default_threads() -> int:
    code = "import torch; print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)
