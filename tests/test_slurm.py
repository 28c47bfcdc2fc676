"""launcher=slurm against a real Slurm: a one-node cluster (Debian's slurmctld, slurmd, munge) that this module
starts (tests/servers.py), without accounting, as on many small clusters. The README's commands, run as a user
runs them: a sweep as a job array, a job Slurm requeues mid-training, a job out of time requeued by submitit at
Slurm's USR2, a job that ends without a result.
All on one xdist worker (one cluster)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CPU, DLRUN, read_metrics, read_summary
from servers import node_idle, slurm

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]

SLURM = ("-m", "launcher=slurm", "hydra.sweep.dir=sweep", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", *CPU)


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    with slurm() as env:
        yield env


def start(cluster: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([DLRUN, *SLURM, *args], cwd=cwd, env={**os.environ, **cluster, "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def scontrol(cluster: dict[str, str], *args: str) -> str:
    return subprocess.run(["scontrol", *args], env={**os.environ, **cluster}, check=True, capture_output=True,
                          text=True, timeout=60).stdout


def slurm_job_of(cluster: dict[str, str]) -> str:
    """The id of the (one) array task Slurm runs now, e.g. 12_0."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "--states=RUNNING"], env={**os.environ, **cluster},
                         capture_output=True, text=True, timeout=60).stdout.split()
    assert len(out) == 1, out
    return out[0]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def start_requeued_now(cluster: dict[str, str], slurm_id: str, proc: subprocess.Popen, timeout: float) -> None:
    """Once the requeued job waits (PENDING) and the node has finished with its previous run (idle, no longer
    completing), start it now: Slurm would hold it back about two minutes (BeginTime). Started while the node was
    still completing, the job could fail at launch, with no output (seen once in CI)."""
    deadline = time.monotonic() + timeout
    while ("JobState=PENDING" not in scontrol(cluster, "show", "job", slurm_id)
           or not node_idle({**os.environ, **cluster})):
        assert time.monotonic() < deadline and proc.poll() is None, f"job {slurm_id} was not requeued"
        time.sleep(0.2)
    scontrol(cluster, "update", f"JobId={slurm_id}", "StartTime=now")


def requeue_once_checkpointed(cluster: dict[str, str], job: Path, proc: subprocess.Popen) -> None:
    """`scontrol requeue` of the running job once its run folder has a checkpoint, then started at once."""
    wait_for(job / "checkpoints" / "last.pt", proc)
    slurm_id = slurm_job_of(cluster)
    scontrol(cluster, "requeue", slurm_id)
    start_requeued_now(cluster, slurm_id, proc, timeout=60)


def test_a_sweep_runs_as_a_job_array_without_sacct_noise(cluster, tmp_path):
    proc = start(cluster, tmp_path, "hydra.launcher.array_parallelism=1", "trainer.epochs=1", "optimizer=sgd,adam")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "sacct" not in out + err and "Bypassing" not in out + err  # accounting is off: squeue answers
    (script,) = (tmp_path / "sweep" / ".submitit").rglob("*_submission.sh")
    assert "#SBATCH --array=0-1%1\n" in script.read_text()  # one job at a time
    for job, optimizer in (("0", "sgd"), ("1", "adam")):
        summary = read_summary(tmp_path / "sweep" / job)
        assert summary["status"] == "completed" and f"optimizer={optimizer}" in summary["overrides"]
    rows = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())["jobs"]
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "completed")]


def test_a_job_slurm_requeues_continues_from_its_checkpoint(cluster, tmp_path, trained):
    """`scontrol requeue` (as after a node failure or a preemption): Slurm stops the job with SIGTERM (dlrun writes
    a checkpoint), starts it again, and the job continues from last.pt (SLURM_RESTART_COUNT), with no USR2 and
    no resume= from anyone; it ends where an uninterrupted run of the same seed does."""
    args = ("trainer.epochs=20",)
    proc = start(cluster, tmp_path, *args)
    job = tmp_path / "sweep" / "0"
    requeue_once_checkpointed(cluster, job, proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = read_summary(job)
    assert summary["status"] == "completed"
    assert len(summary["resumed"]) == 1 and summary["resumed"][0]["epoch"] >= 1  # continued, not started over
    assert [m["epoch"] for m in read_metrics(job)] == list(range(1, 21))
    assert summary["final"] == pytest.approx(read_summary(trained(*args, *CPU))["final"])


def test_a_job_that_ends_without_a_result_is_one_line(cluster, tmp_path):
    proc = start(cluster, tmp_path, "trainer.epochs=200")
    wait_for(tmp_path / "sweep" / "0" / "summary.json", proc)
    slurm_id = slurm_job_of(cluster)
    subprocess.run(["scancel", slurm_id], env={**os.environ, **cluster}, check=True, timeout=60)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, out + err
    assert f"dlrun: error: Slurm job {slurm_id} (sweep job #0, its folder under sweep) ended without a result " \
           f"(state CANCELLED); its log: sweep/.submitit/{slurm_id.split('_')[0]}/" in err.splitlines()
    assert "Traceback" not in err


def test_a_job_of_two_tasks_trains_one_model_like_one_process(cluster, tmp_path, trained):
    """hydra.launcher.tasks_per_node=2: submitit starts the job in two Slurm tasks, which become ranks 0 and 1
    (Slurm's SLURM_PROCID, SLURM_NTASKS, the first node of the job as rendezvous) and train one model into one
    run folder, equal to one process without dropout and batch norm. (Two nodes need two machines.)"""
    exact = ("trainer.epochs=3", "model.dropout=0", "model.batch_norm=false")
    proc = start(cluster, tmp_path, "hydra.launcher.tasks_per_node=2", "hydra.launcher.mem_gb=4", *exact)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = read_summary(tmp_path / "sweep" / "0")
    assert summary["status"] == "completed" and summary["processes"] == 2
    single = read_summary(trained(*exact, *CPU))
    assert summary["steps"] == single["steps"]
    assert summary["final"] == pytest.approx(single["final"], rel=1e-5, abs=1e-6)


def test_a_two_task_ddp_job_slurm_requeues_continues_like_one_process(cluster, tmp_path, trained):
    """`scontrol requeue` of a job whose two tasks train one model: both ranks stop at the same step with a
    checkpoint; restarted, task 0 continues the run and task 1 joins it; the end equals one process."""
    exact = ("trainer.epochs=12", "model.dropout=0", "model.batch_norm=false")
    proc = start(cluster, tmp_path, "hydra.launcher.tasks_per_node=2", "hydra.launcher.mem_gb=4", *exact)
    job = tmp_path / "sweep" / "0"
    requeue_once_checkpointed(cluster, job, proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = read_summary(job)
    assert summary["status"] == "completed" and summary["processes"] == 2 and len(summary["resumed"]) == 1
    single = read_summary(trained(*exact, *CPU))
    assert summary["final"] == pytest.approx(single["final"], rel=1e-5, abs=1e-6)


def test_a_job_slurm_would_never_start_is_one_line(cluster, tmp_path):
    """Two nodes from a one-node partition: Slurm takes the job and leaves it pending for ever
    (PartitionNodeLimit, or first PartitionConfig); dlrun cancels it and says why, instead of waiting."""
    proc = start(cluster, tmp_path, "hydra.launcher.nodes=2", "trainer.epochs=1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    (line,) = [line for line in err.splitlines() if line.startswith("dlrun: error:")]
    assert re.fullmatch(r"dlrun: error: Slurm cannot run job \d+: (PartitionNodeLimit|PartitionConfig) \(it asks "
                        r"for more than the partition allows: hydra.launcher.nodes, tasks_per_node, timeout_min, "
                        r"mem_gb or partition\); it was cancelled", line), line
    assert "Traceback" not in err


def test_a_job_out_of_time_is_requeued_once_then_told_what_to_raise(cluster, tmp_path):
    """A two-minute limit with USR2 30 s before it and one requeue allowed (max_num_timeout=1). At the first USR2
    submitit requeues the job (Slurm then holds it back about two minutes: started here at once) and the job
    continues from its last.pt; at the second, submitit ends it, and one line names the job, its folder and what
    to change. Slurm may send the signal up to a minute early, so the limit leaves the run time to start and
    checkpoint first (a one-minute limit could kill the job while Python was still importing). That a job
    requeued by USR2 ends equal to an uninterrupted run is tested with launcher=submitit_local, where the signal
    comes when the test wants."""
    proc = start(cluster, tmp_path, "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=30",
                 "hydra.launcher.max_num_timeout=1", "trainer.epochs=5000", "trainer.batch_size=8")
    job = tmp_path / "sweep" / "0"
    wait_for(job / "checkpoints" / "last.pt", proc)
    start_requeued_now(cluster, slurm_job_of(cluster), proc, timeout=180)  # requeued at the first USR2
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    summary = read_summary(job)
    assert summary["status"] == "failed" and "timed-out too many times" in summary["error"]
    (resumed,) = summary["resumed"]  # continued once from its checkpoint, not started over
    epochs = [m["epoch"] for m in read_metrics(job)]
    assert resumed["epoch"] >= 1 and epochs == list(range(1, len(epochs) + 1)) and len(epochs) > resumed["epoch"]
    assert (job / "checkpoints" / "last.pt").is_file()
    assert err.strip().splitlines()[-1] == (
        "dlrun: 1 of 1 jobs did not complete: #0 (launcher=slurm device=cpu device.threads=1 trainer.epochs=5000 "
        "trainer.batch_size=8): out of time more often than hydra.launcher.max_num_timeout allows (its folder "
        "sweep/0 keeps its last checkpoint): raise hydra.launcher.timeout_min, set trainer.checkpoint_every=N so "
        "each requeue keeps its progress, and run the same command with hydra.sweep.dir=sweep to continue it")


def test_a_controller_that_does_not_answer_is_one_line(cluster, tmp_path):
    """The cluster's configuration names a controller port where nothing listens (slurmctld down)."""
    from servers import free_port

    conf = tmp_path / "slurm.conf"
    conf.write_text(re.sub(r"SlurmctldPort=\d+", f"SlurmctldPort={free_port()}", Path(cluster["SLURM_CONF"]).read_text()))
    proc = start({"SLURM_CONF": str(conf)}, tmp_path, "trainer.epochs=1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    (line,) = [line for line in err.splitlines() if line.startswith("dlrun: error:")]
    assert line.startswith("dlrun: error: Slurm did not take the jobs: ") and "Unable to contact slurm controller" in line
    assert line.endswith("(is slurmctld up and reachable from here? sbatch reads the cluster from SLURM_CONF or "
                         "/etc/slurm/slurm.conf)")
    assert "Traceback" not in err
