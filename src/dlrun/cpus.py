"""The CPUs this process may really use, and how its OpenMP threads wait (torch-free).

`usable_cpus()` is the smallest of: the cores in the process's affinity mask (taskset, numactl,
container cpusets), the cgroup CPU quota (Docker `--cpus`, Kubernetes limits; cgroup v2 and v1),
and Slurm's allocation (SLURM_CPUS_PER_TASK). `os.cpu_count()` counts the host's cores, which is
what a job in a container or a Slurm step must not take.

OpenMP's default wait policy lets an idle worker thread spin for a while before it sleeps. When
the machine is busy (other jobs, a CI runner, a VM whose host steals CPU time), the spinning
threads compete with the very threads they wait for, and a two-thread torch step can take 10-100x
longer than a one-thread step (bench/threads.py measures it). PASSIVE makes waiting threads sleep.
dlrun sets it for its own processes unless the user has set OMP_WAIT_POLICY (see dlrun/__init__.py);
it must be in the environment before torch (and with it the OpenMP runtime) is loaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

WAIT_POLICY = "PASSIVE"


def set_wait_policy() -> None:
    """OMP_WAIT_POLICY=PASSIVE for this process and its children, unless already set."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's quota (None: no quota)."""
    v2 = root / "cpu.max"
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """How many CPUs this process may keep busy (at least 1)."""
    limits = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)]
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        limits.append(math.ceil(quota))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit():
        limits.append(int(slurm))
    return max(1, min(limits))
