"""Multi-process data parallel training: real torch.distributed (gloo) with 2 CPU processes.

`dlrun trainer.devices=2` is run in this process (`cli`): it spawns its two ranks as new processes, so
those tests are slow. A real `dlrun` process is kept where the signal goes to the launching command,
and torchrun starts its own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import CPU, DLRUN, read_metrics, read_summary
from servers import free_port

from dlrun.config.validate import check_data_parallel
from dlrun.distributed import Ranks, first_host, slurm_env
from dlrun.errors import ConfigError

# No dropout and no batch norm: then 2 processes on halves of each batch compute the very
# gradients of one process on the whole batch, and the runs must agree to float rounding.
EXACT = ["trainer.epochs=3", "model.dropout=0", "model.batch_norm=false", *CPU]


def test_shards_are_contiguous_slices_that_cover_the_batch():
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    shards = [Ranks(rank, 3).shard(x, y) for rank in range(3)]
    assert [len(sy) for _, sy in shards] == [3, 3, 4]
    assert torch.equal(torch.cat([sy for _, sy in shards]), y)
    assert torch.equal(torch.cat([sx for sx, _ in shards]), x)
    assert Ranks().shard(x, y)[1] is y  # one process: the batch itself


@pytest.mark.parametrize(
    "overrides,n_train,message",
    [
        ({"on_nonfinite": "skip"}, 128, "trainer.on_nonfinite='skip' is invalid"),
        ({"batch_size": 64}, 129, "leave a last batch of 1"),
        ({"batch_size": 1}, 128, "trainer.batch_size=1 is invalid"),
        ({"devices": 4}, 128, "must be 1 or 2"),
    ],
)
def test_data_parallel_rules(make_cfg, overrides, n_train, message):
    trainer = make_cfg(*(f"trainer.{k}={v}" for k, v in overrides.items())).trainer
    with pytest.raises(ConfigError, match=message):
        check_data_parallel(trainer, 2, n_train)
    check_data_parallel(make_cfg().trainer, 2, 128)


def test_the_tasks_of_a_slurm_job_map_to_ranks():
    """A multi-task Slurm job (hydra.launcher.nodes, tasks_per_node): ranks from Slurm's task variables, the
    rendezvous on the first node (one slurmd cannot host two nodes: tests/test_slurm.py runs two tasks on one)."""
    env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-06],cpu1",
           "SLURM_JOB_ID": "123456"}
    assert slurm_env(env) == Ranks(5, 8, 1, "tcp://gpu03:23456")
    assert slurm_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}).rendezvous == "tcp://10.0.0.1:29500"
    assert slurm_env({**env, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # one task: not DDP by Slurm
    assert slurm_env({}) is None
    assert [first_host(n) for n in ("node[03-05,9],gpu1", "a1,b2", "solo", "n[7]")] == ["node03", "a1", "solo", "n7"]


@pytest.fixture
def single_process(trained) -> dict:
    """The single-process run the DDP runs are compared with."""
    return read_summary(trained(*EXACT))


def run_folders(cwd: Path) -> list[Path]:
    return [p.parent for p in (cwd / "outputs").rglob("summary.json")]


def assert_same_run(ddp: dict, single: dict) -> None:
    assert ddp["status"] == "completed" and ddp["processes"] == 2
    assert ddp["steps"] == single["steps"]  # the same global batches
    assert ddp["final"] == pytest.approx(single["final"], rel=1e-5, abs=1e-6)


def stop_when_checkpointed(proc: subprocess.Popen, runs: Callable[[], list[Path]]) -> str:
    """SIGTERM to `proc` once one of `runs()` has a checkpoint; what it then wrote on stderr."""
    try:
        deadline = time.monotonic() + 120
        while not any((run / "checkpoints" / "last.pt").is_file() for run in runs()):
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint was written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=120)[1]
    finally:
        proc.kill()


@pytest.mark.slow
def test_two_processes_train_like_one_into_one_run_folder(cli, tmp_path, single_process):
    ran = cli("dlrun", "trainer.devices=2", *EXACT)
    assert ran.returncode == 0, ran.stderr
    (run,) = run_folders(tmp_path)  # one folder for both ranks
    summary = read_summary(run)
    assert_same_run(summary, single_process)
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]  # written once, by rank 0
    assert "trainer.devices=2" in summary["overrides"]
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "dlrun.log").read_text()


@pytest.mark.slow
def test_torchrun_ranks_share_rank_0s_config_and_run_folder_and_resume(data_dir, tmp_path, single_process):
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "-m", "dlrun"]
    env = {**os.environ, "DLRUN_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([*torchrun, *EXACT], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stop_when_checkpointed(proc, lambda: run_folders(tmp_path))  # torchrun passes SIGTERM to its workers
    (run,) = run_folders(tmp_path)  # one folder, made by rank 0's Hydra
    stopped = read_summary(run)
    assert stopped["status"] == "interrupted"
    resumed = subprocess.run([*torchrun, f"resume={run}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert run_folders(tmp_path) == [run]
    summary = read_summary(run)
    assert summary["resumed"][0]["step"] == stopped["steps"]
    assert_same_run(summary, single_process)
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_process(data_dir, tmp_path, single_process):
    """Multi-node as torchrun runs it, with two "nodes" on the loopback address: c10d rendezvous hands out the
    ranks; the node that gets rank 0 runs Hydra and makes the one run folder (a file system both nodes see).
    One node is started with torchrun, the other with dlrun-torchrun (torchrun itself, the same arguments)."""
    port, env = free_port(), {**os.environ, "DLRUN_DATA_DIR": str(data_dir)}
    options = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=two-nodes", "-m", "dlrun", *EXACT]
    nodes = [subprocess.Popen([str(Path(sys.executable).with_name(launcher)), *options], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for launcher in ("torchrun", "dlrun-torchrun")]
    try:
        errors = [proc.communicate(timeout=300)[1] for proc in nodes]
    finally:
        for proc in nodes:
            proc.kill()
    assert [proc.returncode for proc in nodes] == [0, 0], errors
    (run,) = run_folders(tmp_path)
    assert_same_run(read_summary(run), single_process)
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]


def test_a_rendezvous_that_fails_is_one_line_under_dlrun_torchrun(tmp_path):
    """dlrun-torchrun: an endpoint where nothing answers (a node that is not the store's host: is_host=false), and a
    rendezvous that the second node never joins, each end in one line naming the option, exit status 1, before any
    dlrun code ran (no run folder)."""
    launcher = str(Path(sys.executable).with_name("dlrun-torchrun"))
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    closed, alone = free_port(), free_port()
    procs = [subprocess.Popen([launcher, *common, *options, "-m", "dlrun", *CPU], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for options in ([f"--rdzv-endpoint=127.0.0.1:{closed}", "--rdzv-conf=is_host=false,read_timeout=3"],
                             [f"--rdzv-endpoint=127.0.0.1:{alone}", "--rdzv-conf=join_timeout=3"])]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    unreachable, joined_alone = [(proc.returncode, *out) for proc, out in zip(procs, outputs)]
    for code, out, err in (unreachable, joined_alone):
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert unreachable[2].startswith(f"dlrun-torchrun: error: no rendezvous at --rdzv-endpoint=127.0.0.1:{closed} "
                                     "(--rdzv-backend=c10d): ")
    assert "timed out after 3000ms" in unreachable[2]
    assert joined_alone[2].startswith(f"dlrun-torchrun: error: at --rdzv-endpoint=127.0.0.1:{alone} "
                                      "(--rdzv-backend=c10d), fewer than --nnodes=2 nodes joined")
    assert not list(tmp_path.iterdir())


def worker_of_rank(parent: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=`rank` (a child of its agent `parent`)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
def test_an_elastic_run_continues_after_torchrun_restarts_a_killed_worker(data_dir, tmp_path, single_process):
    """torchrun --max-restarts=1: rank 1 killed (SIGKILL) after the first checkpoint; torchrun restarts the group,
    and rank 0's Hydra finds the run this torchrun began (its timestamped folder named by the rendezvous id in
    the summary) and continues it from last.pt, with no resume= typed. The run ends like one process's."""
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2",
                "--max-restarts=1", "-m", "dlrun", *EXACT]
    proc = subprocess.Popen(torchrun, cwd=tmp_path, env={**os.environ, "DLRUN_DATA_DIR": str(data_dir)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any((run / "checkpoints" / "last.pt").is_file() for run in run_folders(tmp_path)):
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint was written"
            time.sleep(0.05)
        os.kill(worker_of_rank(proc.pid, 1), signal.SIGKILL)
        err = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    (run,) = run_folders(tmp_path)  # the restart made no new folder
    assert f"dlrun: torchrun restart 1: continuing {run.relative_to(tmp_path)} from its last checkpoint" in err
    summary = read_summary(run)
    assert len(summary["resumed"]) == 1 and summary["elastic_run_id"]
    assert_same_run(summary, single_process)
    assert [m["epoch"] for m in read_metrics(run)][-1] == 3


@pytest.mark.slow
def test_an_interrupted_ddp_run_resumes_where_it_stopped(cli, data_dir, tmp_path, single_process):
    """SIGTERM to the launching `dlrun` (a real process: the signal must not reach this one), which
    passes it to both ranks; the resume is launched from here."""
    run = tmp_path / "run"
    proc = subprocess.Popen([DLRUN, "hydra.run.dir=run", "trainer.devices=2", *EXACT], cwd=tmp_path,
                            env={**os.environ, "DLRUN_DATA_DIR": str(data_dir)}, stderr=subprocess.PIPE, text=True)
    err = stop_when_checkpointed(proc, lambda: [run])
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = read_summary(run)
    assert stopped["status"] == "interrupted" and "resume=" in err
    resumed = cli("dlrun", "resume=run")
    assert resumed.returncode == 0, resumed.stderr
    summary = read_summary(run)
    assert summary["resumed"][0]["step"] == stopped["steps"]
    assert_same_run(summary, single_process)
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]


@pytest.mark.slow
def test_gradient_accumulation_under_ddp_matches_one_process(cli, tmp_path, trained):
    """Micro-batches accumulate without an all-reduce (DDP's no_sync) until the step's last one."""
    args = [*EXACT, "trainer.accumulate=2", "trainer.batch_size=32", "trainer.epochs=2"]
    cli("dlrun", "hydra.run.dir=ddp", "trainer.devices=2", *args, check=True)
    ddp, one = read_summary(tmp_path / "ddp"), read_summary(trained(*args))
    assert ddp["steps"] == one["steps"] == 2 * 20  # ceil(1259 / 32) = 40 micro-batches, 20 steps an epoch
    assert ddp["final"] == pytest.approx(one["final"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_mixup_swa_and_top_k_under_ddp_match_one_process(cli, tmp_path, trained):
    """The batch is augmented and mixed whole before it is cut into the ranks' shards; the averaged weights and the
    k best epochs follow the ranks' common weights."""
    args = [*EXACT, "trainer.mixup=0.4", "trainer.cutmix=1.0", "trainer.swa_start=2", "trainer.save_top_k=2",
            "trainer.model_summary=false"]
    cli("dlrun", "hydra.run.dir=ddp", "trainer.devices=2", *args, check=True)
    ddp, one = read_summary(tmp_path / "ddp"), read_summary(trained(*args))
    assert ddp["final"] == pytest.approx(one["final"], rel=1e-5, abs=1e-6)
    assert ddp["swa"] == pytest.approx(one["swa"], rel=1e-5, abs=1e-6)
    assert [e["epoch"] for e in ddp["top_k"]] == [e["epoch"] for e in one["top_k"]]
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints" / "top").iterdir()) == \
        [f"epoch-{e['epoch']:04d}.pt" for e in sorted(one["top_k"], key=lambda e: e["epoch"])]


@pytest.mark.slow
def test_errors_in_the_ranks_reach_the_command(cli, tmp_path):
    """A named error is one line, as with one process; anything else keeps the rank's traceback."""
    named = cli("dlrun", "hydra.run.dir=named", "trainer.devices=2", "trainer.batch_size=34", *CPU)
    assert named.returncode == 1
    assert named.stderr.strip().splitlines()[-1] == (
        "dlrun: error: the 2-process run failed: ConfigError: trainer.batch_size=34 is invalid: must give every one "
        "of the 2 processes at least one sample of every batch (1259 training samples leave a last batch of 1)")
    assert read_summary(tmp_path / "named")["status"] == "failed"
    (tmp_path / "broken.py").write_text(
        "class Broken:\n    def __init__(self, in_shape, num_outputs):\n        raise ValueError('broken model')\n")
    unnamed = cli("dlrun", "hydra.run.dir=unnamed", "trainer.devices=2", "model=custom",
                  "model._target_=broken.Broken", *CPU)
    assert unnamed.returncode == 1
    assert re.search(r"RuntimeError: rank [01] of the 2-process run failed", unnamed.stderr)  # the first to fail
    assert "ValueError: broken model" in unnamed.stderr and 'File "' in unnamed.stderr


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data parallel needs 2 CUDA devices")
def test_two_gpus_train_one_model_with_nccl(cli, tmp_path):
    ran = cli("dlrun", "hydra.run.dir=run", "trainer.devices=2", "device=cuda", "trainer.epochs=5")
    assert ran.returncode == 0, ran.stderr
    summary = read_summary(tmp_path / "run")
    assert summary["processes"] == 2 and summary["device"].startswith("cuda")
    assert summary["final"]["val/acc"] > 0.9


@pytest.mark.slow
def test_ddp_jobs_in_joblib_workers_are_a_clear_error(dlrun_cli, tmp_path):
    """A real `dlrun`: the error is printed by the joblib workers, on the stderr they share with their command."""
    proc = dlrun_cli("-m", "launcher=local_parallel", "hydra.launcher.n_jobs=2", "trainer.devices=2",
                     "optimizer.lr=1e-3,1e-2", "hydra.sweep.dir=sweep")
    assert proc.returncode == 1
    assert "cannot start its processes inside launcher=local_parallel's workers" in proc.stderr
    for job in ("0", "1"):  # recorded in each job's folder, so the sweep summary lists them
        assert read_summary(tmp_path / "sweep" / job)["status"] == "failed"
