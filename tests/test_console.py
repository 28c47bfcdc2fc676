"""What the console shows: whole paths, early stopping, job ids in a parallel sweep, no `nan` before the first loss."""

from __future__ import annotations

import re

import pytest

from conftest import CPU, read_summary
from dlrun.sinks import ConsoleSink


def test_the_live_bar_shows_no_loss_before_the_first_log_interval():
    sink = ConsoleSink()  # not a terminal here: the bar is not drawn, but its columns render
    sink.start(epochs=2, total_steps=10, done_steps=0)
    first = sink.progress.columns[3].render(sink.progress.tasks[0]).plain
    sink.step(epoch=1, step=5, loss=0.123456, samples_per_s=12345.6)
    later = sink.progress.columns[3].render(sink.progress.tasks[0]).plain
    sink.progress.stop()
    assert "nan" not in first and "loss -" in first
    assert "loss 0.1235" in later and "12,346 samples/s" in later


def test_the_run_folder_is_printed_whole_on_a_narrow_pipe(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # stdout is captured, not a terminal: the width comes from COLUMNS
    folder = tmp_path / ("a_rather_long_folder_name_that_a_user_copies_" * 3) / "run"
    ran = cli("dlrun", f"hydra.run.dir={folder}", "trainer.epochs=1", *CPU, check=True)
    said = [line for line in ran.stdout.splitlines() if line.startswith("run folder:")]
    assert said == [f"run folder: {folder}"] * 2  # before the first epoch and after the table, whole both times


def test_early_stopping_is_announced(cli, tmp_path):
    # lr 1e-12: val/acc stops improving at once, patience 2 ends the run two evaluations later
    ran = cli("dlrun", "hydra.run.dir=run", "optimizer.lr=1e-12", "trainer.epochs=10",
              "trainer.early_stopping.patience=2", *CPU, check=True)
    summary = read_summary(tmp_path / "run")
    stopped = summary["stopped_early"]
    assert 3 <= stopped < 10 and summary["epochs"] == stopped
    line = f"early stopping at epoch {stopped}: val/acc stopped improving (best {summary['monitor_value']:.4f} at epoch"
    assert line in ran.stdout and line in (tmp_path / "run" / "dlrun.log").read_text()


@pytest.mark.slow
def test_parallel_sweep_lines_name_their_job(dlrun_cli, tmp_path):
    # a process: the jobs print from joblib's worker processes, straight to the inherited stdout
    proc = dlrun_cli("-m", "launcher=local_parallel", "hydra.launcher.n_jobs=2", "optimizer.lr=1e-3,2e-3",
                     "trainer.epochs=2", *CPU, check=True)
    epoch_lines = [line for line in proc.stdout.splitlines() if re.search(r"epoch \d/2 ", line)]
    assert len(epoch_lines) == 4
    assert sorted(line.split("]")[0] for line in epoch_lines) == ["[job 0", "[job 0", "[job 1", "[job 1"]
    summaries = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*/summary.json"))
    assert [read_summary(s.parent)["job"] for s in summaries] == [0, 1]


def test_a_run_says_what_it_trains_and_where_before_its_first_epoch(cli, tmp_path):
    """Also where the output is not a terminal (a log, a pipe, CI): the first lines come before epoch 1 ends."""
    ran = cli("dlrun", "hydra.run.dir=run", "trainer.epochs=2", *CPU, check=True)
    lines = ran.stdout.splitlines()
    start = "training CNN (53,098 parameters) on digits (1,259 train / 179 val / 359 test) for 2 epochs, 40 steps " \
            "(cpu, 1 thread)"
    assert lines[0] == start and lines[1] == f"run folder: {tmp_path / 'run'}", lines[:3]
    table = (tmp_path / "run" / "model_summary.txt").read_text().splitlines()  # trainer.model_summary (default on)
    assert lines[2:2 + len(table)] == table and lines[2 + len(table)].startswith("epoch 1/2")

