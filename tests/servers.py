"""Real servers for the tests that need one, started from the machine's installed packages and stopped after.

Slurm: Debian's `slurmctld`, `slurmd` and `munge`, as a one-node cluster with its own configuration file
(`SLURM_CONF`) and ports; needs root, as a real node does.

PostgreSQL: Debian's `postgresql` package (`apt-get install postgresql`; `.ci/run` installs it). A private
cluster is made with `initdb` in a temporary folder and started on a free port of the loopback address, as
the `postgres` user when the tests run as root (the server refuses root). Where the package is missing,
the tests that need it are skipped with that reason; under CI (`CI=true`) they fail instead, since CI must
have started what its tests need.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable(why: str) -> None:
    """Skip the test, saying why; fail it under CI, which must provide what the tests need."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must install it: .ci/run)")
    pytest.skip(why)


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own, for as long as the context lasts: yields the SQLAlchemy URL of an
    empty database (`postgresql+psycopg://dlrun@127.0.0.1:<port>/dlrun`)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        unavailable("PostgreSQL's server is not installed (apt-get install postgresql)")
    bin_dir = Path(bins[-1]).parent
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="dlrun-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    port, data = free_port(), folder / "data"

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "dlrun", "--auth=trust", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60", "start",
            "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off")
        try:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dlrun", "dlrun")
            yield f"postgresql+psycopg://dlrun@127.0.0.1:{port}/dlrun"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


SLURM_CONF = """\
ClusterName=dlrun-tests
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
KillWait=5
MinJobAge=300
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def node_idle(env: dict[str, str]) -> bool:
    """Whether the cluster's node is idle: up, and neither running nor still completing a job."""
    return "idle" in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout


@contextmanager
def slurm() -> Iterator[dict[str, str]]:
    """A one-node Slurm cluster of its own (Debian's slurmctld, slurmd and munge; this machine is the node),
    for as long as the context lasts: yields the environment its commands need (`SLURM_CONF`). Accounting is
    off, as on many small clusters. Needs root (slurmd starts jobs as their user)."""
    if not all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        unavailable("Slurm is not installed (apt-get install slurmctld slurmd munge)")
    if os.geteuid() != 0:
        unavailable("a Slurm node (slurmd) needs root")
    folder = Path(tempfile.mkdtemp(prefix="dlrun-slurm-"))
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    memory_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 512
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), ctld_port=free_port(), d_port=free_port(),
                                      folder=folder, cpus=os.cpu_count(), memory_mb=memory_mb))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munged = start_munge(folder)
    try:
        subprocess.run(["slurmctld", "-f", str(conf), "-i"], check=True, env=env, timeout=60)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, timeout=60)
        deadline = time.monotonic() + 60
        while not node_idle(env):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Slurm node did not come up: {(folder / 'slurmd.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield {"SLURM_CONF": str(conf)}
    finally:
        end_jobs(env, folder)
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=60)
        for pid_file in ("slurmctld.pid", "slurmd.pid"):
            stop_pid(folder / pid_file)
        for pid in subprocess.run(["pgrep", "-x", "slurmstepd"], capture_output=True, text=True).stdout.split():
            with suppress(OSError):  # a job step of this cluster whose slurmd is gone (its spool files are ours)
                if any(os.readlink(fd).startswith(str(folder)) for fd in Path(f"/proc/{pid}/fd").iterdir()):
                    os.kill(int(pid), signal.SIGKILL)
        munged.terminate()
        munged.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def end_jobs(env: dict[str, str], folder: Path) -> None:
    """Cancel every job of the cluster (all are the tests') and wait up to 20 s for them to end, so that no job
    step outlives the cluster."""
    subprocess.run(["scancel", "--full", *subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True,
                                                         text=True, timeout=60).stdout.split()],
                   env=env, capture_output=True, timeout=60)
    deadline = time.monotonic() + 20
    while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=60).stdout.strip():
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)


def start_munge(folder: Path) -> subprocess.Popen:
    """A munged of the cluster's own (Slurm's authentication): its own key and socket in `folder`, whatever
    munged the machine runs (the cluster's commands find the socket through AuthInfo in slurm.conf). Ten
    threads, not two: the jobs, slurmd and dlrun's squeue polls all ask at once."""
    folder.chmod(0o755)  # munged refuses a socket in a folder that not everybody may enter
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    with open(folder / "munged.log", "w") as log:
        daemon = subprocess.Popen(["munged", "--foreground", f"--socket={folder / 'munge.socket'}",
                                   f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
                                   f"--seed-file={folder / 'munged.seed'}", "--num-threads=10"], stderr=log)
    deadline = time.monotonic() + 30
    while subprocess.run(["munge", "-n", f"--socket={folder / 'munge.socket'}"], capture_output=True).returncode:
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise RuntimeError(f"munged did not start: {(folder / 'munged.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return daemon


def stop_pid(pid_file: Path) -> None:
    """Wait for the daemon named by `pid_file` to exit (scontrol shutdown asked it to), killing it after 20 s."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
