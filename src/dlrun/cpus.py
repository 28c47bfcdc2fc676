"""The CPUs this process may really use, and how its OpenMP threads wait (torch-free).

`usable_cpus()` is the smallest of: the cores in the process's affinity mask (taskset, numactl,
container cpusets), the cgroup CPU quota (Docker `--cpus`, Kubernetes limits; cgroup v2 and v1),
and Slurm's allocation (SLURM_CPUS_PER_TASK). `os.cpu_count()` counts the host's cores, which is
what a job in a container or a Slurm step must not take.

OpenMP's default wait policy lets an idle worker thread spin for a while before it sleeps. On an
idle machine that is the fastest (a two-thread step of a small MLP: ~1.9 ms spinning, ~3.6 ms with
PASSIVE, ~2.8 ms on one thread). On a busy one (other jobs, a CI runner, a VM whose host steals CPU
time) the spinning threads compete with the very threads they wait for, and a two-thread step takes
2-50x longer than with PASSIVE, where waiting threads sleep (bench/threads.py measures both). So dlrun
picks PASSIVE when the machine is busy as it starts (a load average of at least half the usable
CPUs) and leaves OpenMP's default otherwise, unless the user has set OMP_WAIT_POLICY (the
`dlrun` command's first step, cli.main). It must be decided before torch (and with it the OpenMP runtime) is loaded, so a
load that only arrives later in a run is not seen.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

BUSY = 0.5  # a load average of at least this share of the usable CPUs is a busy machine


def wait_policy(load: float, cpus: int) -> str | None:
    """PASSIVE on a busy machine, else None (OpenMP's default, spinning)."""
    return "PASSIVE" if load >= BUSY * cpus else None


def set_wait_policy() -> None:
    """OMP_WAIT_POLICY for this process and its children, as `wait_policy` decides, unless already set."""
    if "OMP_WAIT_POLICY" not in os.environ and hasattr(os, "getloadavg"):
        policy = wait_policy(os.getloadavg()[0], usable_cpus())
        if policy:
            os.environ["OMP_WAIT_POLICY"] = policy


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
