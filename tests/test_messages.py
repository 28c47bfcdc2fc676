"""What dlrun says is true: about checkpoints, exit codes, the command to continue, and failures
of the disk or of the run folder's files. Real `dlrun` processes and real signals."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import DLRUN, read_summary
from dlrun.errors import Interrupted

pytestmark = pytest.mark.slow
CPU = ["device=cpu", "device.threads=1"]


def env_of(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "DLRUN_DATA_DIR": str(data_dir), "COLUMNS": "200",
            "PATH": f"{Path(DLRUN).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def start_and_wait_for_an_epoch(args: list[str], cwd: Path, env: dict, run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([DLRUN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    return proc


def test_a_loss_that_blows_up_before_any_checkpoint_says_so(dlrun_cli, tmp_path):
    proc = dlrun_cli("hydra.run.dir=run", "optimizer=sgd", "optimizer.lr=1e12", "trainer.epochs=1", *CPU)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "the training loss became" in line and line.endswith("no checkpoint had been written yet"), line
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_stop_without_checkpoints_does_not_promise_one(tmp_path, data_dir):
    run = tmp_path / "run"
    proc = start_and_wait_for_an_epoch([f"hydra.run.dir={run}", "trainer.epochs=200", "trainer.batch_size=8",
                                        "trainer.save_checkpoints=false", *CPU], tmp_path, env_of(data_dir), run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "no checkpoint was written (trainer.save_checkpoints=false)" in err and "continue with" not in err
    assert read_summary(run)["status"] == "interrupted"
    resumed = subprocess.run([DLRUN, f"resume={run}"], cwd=tmp_path, env=env_of(data_dir), capture_output=True,
                             text=True)
    assert resumed.returncode == 1
    assert one_line(resumed.stderr).endswith("(the run was started with trainer.save_checkpoints=false)")


def test_resume_of_a_folder_without_a_run_says_so(dlrun_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = dlrun_cli("resume=empty")
    assert proc.returncode == 1
    assert one_line(proc.stderr).endswith("does not exist (no dlrun run was started in this folder)")


def test_two_signals_exit_as_the_signal_says(tmp_path, data_dir):
    run = tmp_path / "run"
    proc = start_and_wait_for_an_epoch([f"hydra.run.dir={run}", "trainer.epochs=200", "trainer.batch_size=8", *CPU],
                                       tmp_path, env_of(data_dir), run)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert read_summary(run)["status"] == "interrupted"


def test_a_signal_during_the_final_evaluation_interrupts_the_run(make_cfg, tmp_path, monkeypatch):
    import dlrun.run

    evaluate = dlrun.run.final_results

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the test split is evaluated
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(dlrun.run, "final_results", signalled)
    with pytest.raises(Interrupted, match="a checkpoint was written"):
        dlrun.run.run(make_cfg("trainer.epochs=1", *CPU), run_dir=tmp_path)
    assert read_summary(tmp_path)["status"] == "interrupted"
    monkeypatch.setattr(dlrun.run, "final_results", evaluate)
    assert dlrun.run.run(OmegaConf.merge(make_cfg(), {"resume": str(tmp_path)}))["status"] == "completed"


def test_the_printed_resume_command_works_as_printed(tmp_path, data_dir):
    run = tmp_path / "pa th" / "rün 名 #1"
    proc = start_and_wait_for_an_epoch([f"hydra.run.dir='{run}'", "trainer.epochs=40", "trainer.batch_size=8", *CPU],
                                       tmp_path, env_of(data_dir), run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    command = err.strip().splitlines()[-1].split("continue with: ", 1)[1]
    resumed = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env_of(data_dir), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, (command, resumed.stderr)
    assert read_summary(run)["status"] == "completed"


def test_ctrl_c_during_start_up_is_one_line(tmp_path, data_dir):
    for delay in (0.3, 0.8, 1.2, 2.0):  # while the modules load, in Hydra's start, while torch is imported
        proc = subprocess.Popen([DLRUN, "hydra.run.dir=run", *CPU], cwd=tmp_path, env=env_of(data_dir),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err, (delay, err)
        # before the run owns its folder, or (later) once it does: then it stops at its first step
        assert one_line(err).startswith(("dlrun: interrupted", "dlrun: stopped by SIGINT after step 0")), (delay, err)
        shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_a_full_disk_fails_the_run_in_one_line(tmp_path, data_dir):
    """The checkpoint cannot be written (the process may write files of at most 64 KiB, so the
    kernel refuses the checkpoint as it would on a full disk): one line, no temp file left, the
    summary says failed with the reason."""
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([DLRUN, "hydra.run.dir=run", "trainer.epochs=1", "logger.tensorboard=false", *CPU],
                          cwd=tmp_path, env=env_of(data_dir), capture_output=True, text=True, preexec_fn=limited)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith("dlrun: error: cannot write ") and "best.pt: File too large" in line, line
    run = tmp_path / "run"
    assert not list(run.rglob("*.tmp"))
    summary = read_summary(run)
    assert summary["status"] == "failed" and "File too large" in summary["error"]


def test_a_damaged_metrics_file_is_named_not_a_traceback(dlrun_cli, tmp_path, data_dir):
    dlrun_cli("hydra.run.dir=run", "trainer.epochs=2", *CPU, check=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and ".hydra" not in p.parts}
    report = subprocess.run([str(Path(DLRUN).with_name("dlrun-report")), "run"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert report.returncode == 1
    assert one_line(report.stderr) == (f"dlrun-report: error: {Path('run') / 'metrics.jsonl'} line 2 is not an epoch "
                                       "record (damaged?); repair or remove that line")
    resumed = dlrun_cli("resume=run")
    assert resumed.returncode == 1 and "metrics.jsonl line 2 is not an epoch record" in one_line(resumed.stderr)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert {p: b for p, b in after.items() if p.name != "dlrun.log" and p.name != ".dlrun.lock"} == \
        {p: b for p, b in before.items() if p.name != "dlrun.log" and p.name != ".dlrun.lock"}
    assert json.loads(lines[0])["epoch"] == 1


def test_a_sweep_stopped_by_sigterm_exits_143(tmp_path, data_dir):
    proc = subprocess.Popen([DLRUN, "-m", "hydra.sweep.dir=sweep", "trainer.epochs=200", "trainer.batch_size=8",
                             "optimizer=sgd,adam", *CPU], cwd=tmp_path, env=env_of(data_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    metrics = tmp_path / "sweep" / "0" / "metrics.jsonl"
    while not metrics.is_file() or not metrics.read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert read_summary(tmp_path / "sweep" / "0")["status"] == "interrupted"
