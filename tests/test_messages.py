"""What dlrun says is true: about checkpoints, exit codes, the command to continue, and failures
of the disk or of the run folder's files. Real `dlrun` processes and real signals where a signal
is the news (marked slow); the rest in this process (`cli`)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import CPU, DLRUN, read_metrics, read_summary


def env_of(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "DLRUN_DATA_DIR": str(data_dir), "COLUMNS": "200"}


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def start(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([DLRUN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool]) -> None:
    """Poll until `ready()` (what the run folder shows from outside), with the process still running."""
    deadline = time.time() + 180
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)


def has_an_epoch(run_dir: Path) -> Callable[[], bool]:
    metrics = run_dir / "metrics.jsonl"
    return lambda: metrics.is_file() and bool(metrics.read_text())


def start_and_wait_for_an_epoch(args: list[str], cwd: Path, env: dict, run_dir: Path) -> subprocess.Popen:
    proc = start(args, cwd, env)
    wait_until(proc, has_an_epoch(run_dir))
    return proc


def test_a_loss_that_blows_up_before_any_checkpoint_says_so(cli, tmp_path):
    ran = cli("dlrun", "hydra.run.dir=run", "optimizer=sgd", "optimizer.lr=1e12", "trainer.epochs=1", *CPU)
    assert ran.returncode == 1
    line = one_line(ran.stderr)
    assert "the training loss became" in line and line.endswith("no checkpoint had been written yet"), line
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_a_stop_without_checkpoints_does_not_promise_one(cli, tmp_path, data_dir):
    run = tmp_path / "run"
    proc = start_and_wait_for_an_epoch([f"hydra.run.dir={run}", "trainer.epochs=200", "trainer.batch_size=8",
                                        "trainer.save_checkpoints=false", *CPU], tmp_path, env_of(data_dir), run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "no checkpoint was written (trainer.save_checkpoints=false)" in err and "continue with" not in err
    assert read_summary(run)["status"] == "interrupted"
    resumed = cli("dlrun", f"resume={run}")
    assert resumed.returncode == 1
    assert one_line(resumed.stderr).endswith("(the run was started with trainer.save_checkpoints=false)")


def test_resume_of_a_folder_without_a_run_says_so(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    ran = cli("dlrun", "resume=empty")
    assert ran.returncode == 1
    assert one_line(ran.stderr).endswith("does not exist (no dlrun run was started in this folder)")


def test_resume_of_a_checkpoint_file_names_the_folder_to_give(cli, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    ran = cli("dlrun", "resume=run/checkpoints/last.pt")
    assert ran.returncode == 1
    assert one_line(ran.stderr).endswith(f"a file; resume= takes the run folder (here {tmp_path / 'run'}, if it is "
                                         "a run's checkpoint)")


def test_a_run_killed_before_its_first_last_checkpoint_can_be_started_again(cli, tmp_path):
    """Killed between its first best.pt and its first last.pt: resume= cannot continue it and says to start it
    again, and starting it again is allowed (it used to answer "continue it with resume=": a loop)."""
    run = tmp_path / "run"
    cli("dlrun", f"hydra.run.dir={run}", "trainer.epochs=1", *CPU, check=True)
    (run / "checkpoints" / "last.pt").unlink()
    summary = read_summary(run)
    summary["status"] = "failed"
    (run / "summary.json").write_text(json.dumps(summary))
    ran = cli("dlrun", f"resume={run}")
    assert ran.returncode == 1 and one_line(ran.stderr).endswith("start it again with its own command)")
    again = cli("dlrun", f"hydra.run.dir={run}", "trainer.epochs=1", *CPU)
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in read_metrics(run)] == [1] and read_summary(run)["status"] == "completed"


@pytest.mark.slow
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


# A run whose end is long enough to signal from outside: one epoch on a tenth of digits, then a wide CNN
# evaluates the other nine tenths one image at a time (on this machine about 1.4 s of a 4 s run).
LONG_END = ["trainer.epochs=1", "dataset.test_fraction=0.9", "dataset.val_fraction=0.02", "trainer.eval_batch_size=1",
            "model.channels=[256,256]", *CPU]


@pytest.mark.slow
def test_a_signal_during_the_final_evaluation_interrupts_the_run(cli, tmp_path, data_dir):
    run = tmp_path / "run"
    proc = start([f"hydra.run.dir={run}", *LONG_END], tmp_path, env_of(data_dir))
    # last.pt is what training writes last (after the epoch's line and best.pt); the test split comes next
    wait_until(proc, (run / "checkpoints" / "last.pt").is_file)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    (epoch,) = read_metrics(run)  # training had ended: the signal came after its last step
    line = one_line(err)
    assert line.startswith(f"dlrun: stopped by SIGTERM after step {epoch['step']}; a checkpoint was written;"), line
    summary = read_summary(run)
    assert summary["status"] == "interrupted" and "final" not in summary  # checkpointed, its results not recorded
    cli("dlrun", f"resume={run}", check=True)
    assert read_summary(run)["status"] == "completed"


def as_the_shell_reads(command: str) -> list[str]:
    """The arguments bash gives `dlrun` in `command`, run as printed (`dlrun` here a shell function that prints them)."""
    assert command.startswith("dlrun "), command
    shell = subprocess.run(["bash", "-c", "dlrun() { printf '%s\\0' \"$@\"; }; " + command], capture_output=True,
                           text=True, check=True)
    return shell.stdout.split("\0")[:-1]


@pytest.mark.slow
def test_the_printed_resume_command_works_as_printed(cli, tmp_path, data_dir):
    run = tmp_path / "pa th" / "rün 名 #1"
    # 3 epochs: the signal stops the second, so what is left to continue is short
    proc = start_and_wait_for_an_epoch([f"hydra.run.dir='{run}'", "trainer.epochs=3", "trainer.batch_size=8", *CPU],
                                       tmp_path, env_of(data_dir), run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    command = err.strip().splitlines()[-1].split("continue with: ", 1)[1]
    resumed = cli("dlrun", *as_the_shell_reads(command))
    assert resumed.returncode == 0, (command, resumed.stderr)
    assert read_summary(run)["status"] == "completed"


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(tmp_path, data_dir):
    for delay in (0.3, 0.8, 1.2, 2.0):  # while the modules load, in Hydra's start, while torch is imported
        proc = start(["hydra.run.dir=run", *CPU], tmp_path, env_of(data_dir))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err, (delay, err)
        # before the run owns its folder, or (later) once it does: then it stops at its first step
        assert one_line(err).startswith(("dlrun: interrupted", "dlrun: stopped by SIGINT after step 0")), (delay, err)
        shutil.rmtree(tmp_path / "run", ignore_errors=True)


@contextmanager
def files_of_at_most(size: int) -> Iterator[None]:
    """In the block this process may write files of at most `size` bytes: the kernel refuses a larger
    one as it would on a full disk (SIGXFSZ ignored: EFBIG instead of being killed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_fails_the_run_in_one_line(cli, tmp_path):
    """The checkpoint cannot be written (files of at most 64 KiB: the kernel refuses the checkpoint as it
    would on a full disk): one line, no temp file left, the summary says failed with the reason."""
    with files_of_at_most(64 * 1024):
        ran = cli("dlrun", "hydra.run.dir=run", "trainer.epochs=1", "logger.tensorboard=false", *CPU)
    assert ran.returncode == 1
    line = one_line(ran.stderr)
    assert line.startswith("dlrun: error: cannot write ") and "best.pt: File too large" in line, line
    run = tmp_path / "run"
    assert not list(run.rglob("*.tmp"))
    summary = read_summary(run)
    assert summary["status"] == "failed" and "File too large" in summary["error"]


def test_a_damaged_metrics_file_is_named_not_a_traceback(cli, trained, tmp_path):
    run = shutil.copytree(trained("trainer.epochs=3", "trainer.log_every=5", *CPU), tmp_path / "run")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    report = cli("dlrun-report", "run")
    assert report.returncode == 1
    assert one_line(report.stderr) == (f"dlrun-report: error: {Path('run') / 'metrics.jsonl'} line 2 is not an epoch "
                                       "record (damaged?); repair or remove that line")
    resumed = cli("dlrun", "resume=run")
    assert resumed.returncode == 1 and "metrics.jsonl line 2 is not an epoch record" in one_line(resumed.stderr)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert {p: b for p, b in after.items() if p.name != "dlrun.log" and p.name != ".dlrun.lock"} == \
        {p: b for p, b in before.items() if p.name != "dlrun.log" and p.name != ".dlrun.lock"}
    assert json.loads(lines[0])["epoch"] == 1


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_exits_143(tmp_path, data_dir):
    proc = start(["-m", "hydra.sweep.dir=sweep", "trainer.epochs=200", "trainer.batch_size=8", "optimizer=sgd,adam",
                  *CPU], tmp_path, env_of(data_dir))
    wait_until(proc, has_an_epoch(tmp_path / "sweep" / "0"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert read_summary(tmp_path / "sweep" / "0")["status"] == "interrupted"


@pytest.mark.slow
def test_a_closed_console_does_not_stop_the_run(tmp_path, data_dir):
    """`dlrun ... | head -c 1`: the reader of the console goes away after one byte; the run goes on to its end
    (it used to stop with an empty stderr and a summary that said only `SystemExit: 1`)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([DLRUN, f"hydra.run.dir={run}", "trainer.epochs=3", *CPU], cwd=tmp_path,
                            env=env_of(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert read_summary(run)["status"] == "completed" and [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]
    assert "the console's reader has gone (a broken pipe): the run goes on" in err
    assert "epoch=3" in (run / "dlrun.log").read_text()
