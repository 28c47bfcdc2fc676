"""One Optuna study, many workers: several `dlrun -m hparams_search=...` processes started at once share a study
on a real PostgreSQL server (started by the test), on Optuna's journal file, or on SQLite; trial numbers name
the job folders; a killed worker's trial is failed by its heartbeat and run again; `max_trials` bounds the total."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import CPU, DLRUN, read_summary
from servers import postgres, unavailable

pytestmark = pytest.mark.slow  # every test starts worker processes

SEARCH = ("-m", "hparams_search=digits_cnn", "trainer.epochs=1", *CPU)


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([DLRUN, *SEARCH, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(workers: list[subprocess.Popen]) -> list[str]:
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, out in zip(workers, outputs):
        assert worker.returncode == 0, out
        assert "Traceback" not in out, out
    return outputs


def check_folders(sweep: Path, trials: list[optuna.trial.FrozenTrial]) -> None:
    """Job folder N is trial N: its overrides are the trial's parameters, its result the trial's value."""
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(str(t.number) for t in trials)
    for trial in trials:
        summary = read_summary(sweep / str(trial.number))
        assert summary["monitor_value"] == pytest.approx(trial.value)
        assert f"trainer.batch_size={trial.params['trainer.batch_size']}" in summary["overrides"]


def test_three_workers_share_one_study_on_postgresql(tmp_path):
    with postgres() as url:
        workers = [start(tmp_path, f"hydra.sweeper.storage={url}", "hydra.sweeper.n_trials=2") for _ in range(3)]
        finish(workers)
        trials = optuna.load_study(study_name="digits_cnn", storage=url).trials
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(6)]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # each worker sampled its own points
    check_folders(tmp_path / "outputs" / "search" / "digits_cnn", trials)


def test_two_workers_on_a_journal_file_stop_together_at_max_trials(tmp_path):
    journal = tmp_path / "shared" / "study.log"
    args = (f"hydra.sweeper.storage=journal:{journal}", "hydra.sweeper.n_trials=5", "hydra.sweeper.max_trials=3")
    outputs = finish([start(tmp_path, *args) for _ in range(2)])
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="digits_cnn", storage=storage).trials
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(3)]
    assert all("holds max_trials=3 trials" in out for out in outputs)
    check_folders(tmp_path / "outputs" / "search" / "digits_cnn", trials)
    # The sweep summary lists the whole study; each worker reported on its own jobs only.
    jobs = json.loads((tmp_path / "outputs" / "search" / "digits_cnn" / "sweep_summary.json").read_text())["jobs"]
    assert [j["job"] for j in jobs] == ["0", "1", "2"] and len({j["sweep_id"] for j in jobs}) == 2


def test_a_killed_workers_trial_is_failed_by_its_heartbeat_and_run_again(tmp_path):
    """A worker killed mid-trial (SIGKILL: no chance to say so) leaves its trial RUNNING; once its heartbeat is
    older than twice heartbeat_s, the next worker that asks marks it failed and runs its parameters again."""
    beat = ("hydra.sweeper.heartbeat_s=1", "hydra.sweeper.n_trials=1")
    killed = start(tmp_path, *beat, "trainer.epochs=200")
    sweep = tmp_path / "outputs" / "search" / "digits_cnn"
    deadline = time.monotonic() + 120
    while not (sweep / "0" / "metrics.jsonl").exists():  # training has started
        assert time.monotonic() < deadline and killed.poll() is None
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    time.sleep(2.5)  # the heartbeat goes stale
    (out,) = finish([start(tmp_path, *beat)])
    trials = optuna.load_study(study_name="digits_cnn", storage=f"sqlite:///{sweep / 'optuna.db'}").trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL"), (1, "COMPLETE")]
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == 0
    assert "trial 1 runs trial 0 again" in out
    assert read_summary(sweep / "1")["status"] == "completed"


def test_an_unreachable_database_is_one_line_and_makes_no_sweep_folder(tmp_path):
    from servers import free_port

    url = f"postgresql+psycopg://dlrun@127.0.0.1:{free_port()}/dlrun"
    proc = subprocess.run([DLRUN, *SEARCH, f"hydra.sweeper.storage={url}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dlrun: error: hydra.sweeper.storage={url} cannot be opened: ")
    assert "Connection refused" in lines[0] or "connection failed" in lines[0]
    assert not (tmp_path / "outputs").exists()


def test_a_journal_path_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = subprocess.run([DLRUN, *SEARCH, f"hydra.sweeper.storage=journal:{tmp_path}/a_file/study.log"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"dlrun: error: hydra.sweeper.storage=journal:{tmp_path}/a_file/study.log cannot be "
                           f"opened: [Errno 17] File exists: '{tmp_path}/a_file'")
    assert not (tmp_path / "outputs").exists()


def test_a_journal_on_a_read_only_file_system_is_one_line(tmp_path):
    """A read-only folder that even root cannot write: a read-only tmpfs mounted for the test."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        unavailable("mounting a read-only tmpfs needs root (and a machine that allows mounts)")
    try:
        proc = subprocess.run([DLRUN, *SEARCH, f"hydra.sweeper.storage=journal:{folder}/study.log"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"dlrun: error: hydra.sweeper.storage=journal:{folder}/study.log cannot be opened: "
                           "[Errno 30] Read-only file system"), line
    assert not (tmp_path / "outputs").exists()
