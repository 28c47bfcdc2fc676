"""Run-folder integrity through the CLI: one folder per run, one process per folder, checkpoints
that belong to their run, and statuses that never say "running" for a process that is gone.

Real `dlrun` subprocesses where the contract is about processes: started at the same moment, racing
for a folder, stopped by real signals (SIGTERM, SIGKILL), a parallel sweep's worker killed; and a test
hook (HOOK: a sitecustomize.py put on PYTHONPATH) that can SIGKILL a run between two checkpoint
writes, or make processes started together read the clock for their folder names at one instant.
What follows a process (the resume after a kill, a refusal, dlrun-report) and the runs only read or
refused run in this process (`cli`, `trained`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import CPU, DLRUN, Ran, read_metrics, read_summary

TIMING = {"seconds", "samples_per_s"}


# ------------------------------------------------------------------ helpers


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DLRUN_DATA_DIR": str(data_dir), "COLUMNS": "200", **extra}


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([DLRUN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_together(commands: list[list[str]], cwd: Path, env: dict[str, str]) -> list[subprocess.Popen]:
    """Start the commands back to back."""
    return [start(args, cwd, env) for args in commands]


def same_second(commands: list[list[str]], tmp_path: Path, env: dict[str, str], folders_of):
    """Start the commands together, each made to read the clock for its folder's name at one common
    instant: the hook's DLRUN_TEST_NOW_AT, mid-second, 2.5 to 3.5 s ahead. (Left alone, a process
    reads it about 0.6 to 1.2 s after its start and two processes drift apart by up to half a
    second, so even when started just after a second boundary they named their folders in different
    seconds 2 times in 8.) Returns (processes, results, folders)."""
    sentinel = tmp_path / "hook-notes"
    at = int(time.time()) + 3.5
    env = hook_env(tmp_path, env, DLRUN_TEST_NOW_AT=str(at), DLRUN_TEST_HOOK_SENTINEL=str(sentinel))
    procs = start_together(commands, tmp_path, env)
    try:
        results = finish(procs)
    finally:
        stop_all(procs)
    notes = sentinel.read_text() if sentinel.is_file() else ""
    assert all(f"{p.pid} now" in notes for p in procs), f"the clock hook did not run in both processes:\n{notes}"
    folders = folders_of(tmp_path)
    assert len({f.name[:8] for f in folders}) == 1, f"the folders were named in different seconds: {folders}"
    return procs, results, folders


def hook_env(tmp_path: Path, env: dict[str, str], **variables: str) -> dict[str, str]:
    """`env` with the test hook (HOOK, as sitecustomize.py) first on PYTHONPATH, ahead of any
    PYTHONPATH already set, and `variables`, which switch its parts on."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    pythonpath = os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": pythonpath, **variables}


HOOK = '''
"""Test hook (tests/test_integrity.py), imported at start-up from PYTHONPATH. Each part runs only
when its environment variable is set, and notes this process id in $DLRUN_TEST_HOOK_SENTINEL.

DLRUN_TEST_KILL_AFTER=N: SIGKILL this process right after the N-th os.replace onto
checkpoints/last.pt or checkpoints/best.pt.
DLRUN_TEST_NOW_AT=T: Hydra's `now` resolver (which names fresh run and sweep folders) first waits
until wall-clock time T, so that processes started together name their folders at one instant.
"""
import os
import signal
import time


def _note(what):
    with open(os.environ["DLRUN_TEST_HOOK_SENTINEL"], "a") as f:
        f.write(f"{os.getpid()} {what} {time.time():.3f}\\n")


if os.environ.get("DLRUN_TEST_KILL_AFTER"):
    _limit = int(os.environ["DLRUN_TEST_KILL_AFTER"])
    _count = 0
    _replace = os.replace
    _note("kill-hook")

    def _replace_then_maybe_die(src, dst, *args, **kwargs):
        global _count
        _replace(src, dst, *args, **kwargs)
        path = os.path.abspath(os.fsdecode(os.fspath(dst)))
        folder = os.path.basename(os.path.dirname(path))
        if os.path.basename(path) in ("last.pt", "best.pt") and folder == "checkpoints":
            _count += 1
            if _count == _limit:
                os.kill(os.getpid(), signal.SIGKILL)

    os.replace = _replace_then_maybe_die

if os.environ.get("DLRUN_TEST_NOW_AT"):
    from omegaconf import OmegaConf

    _at = float(os.environ["DLRUN_TEST_NOW_AT"])

    def _waiting(register):
        def _register(name, resolver, *args, **kwargs):
            if name == "now":
                real = resolver

                def resolver(pattern):
                    time.sleep(max(0.0, _at - time.time()))
                    _note("now")
                    return real(pattern)
            return register(name, resolver, *args, **kwargs)
        return _register

    for _name in ("register_resolver", "register_new_resolver"):
        if hasattr(OmegaConf, _name):
            setattr(OmegaConf, _name, _waiting(getattr(OmegaConf, _name)))
'''


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Wait for each process; (returncode, stdout, stderr) per process."""
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append((proc.returncode, stdout, stderr))
    return out


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Test cleanup: kill what the test started and is still running."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtimes of the files a refused command must leave alone."""
    paths = [run / "summary.json", run / "metrics.jsonl", run / ".hydra" / "config.yaml",
             *sorted((run / "checkpoints").glob("*.pt"))]
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths if p.is_file()}


def assert_refused(proc: Ran | tuple[int, str, str], words: str) -> None:
    """A refusal: exit status 1 and one line on stderr, `dlrun: error: ...`, naming the reason; no traceback."""
    code, stderr = (proc.returncode, proc.stderr) if hasattr(proc, "returncode") else (proc[0], proc[2])
    assert code == 1, f"expected a refusal (exit 1), got exit {code}; stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlrun: error:"), f"not a one-line refusal:\n{stderr[-3000:]}"
    assert words in lines[0], lines[0]


def wait_for(condition, proc: subprocess.Popen | None, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def has_epoch(run: Path) -> bool:
    path = run / "metrics.jsonl"
    return path.is_file() and bool(path.read_text().strip())


def epochs_of(run: Path) -> list[int]:
    return [m["epoch"] for m in read_metrics(run)]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    got, want = weights(a), weights(b)
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def run_folders(cwd: Path) -> list[Path]:
    """Run folders made by the default pattern outputs/<date>/<time>."""
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.parent.name != "multirun" and p.is_dir())


def sweep_folders(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs" / "multirun").glob("*/*") if p.is_dir())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children(pid: int) -> list[int]:
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in path.read_text().split()]
        except OSError:
            pass
    return found


def process_using(folder: Path, candidates: list[int]) -> int | None:
    """The candidate process holding a file in `folder` open (a job keeps its dlrun.log open)."""
    folder = folder.resolve()
    for pid in candidates:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = Path(os.readlink(fd))
            except OSError:
                continue
            if target.parent == folder:
                return pid
    return None


# ------------------------------------------------------------------ 8a, 8b: one folder per run


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path, data_dir):
    run = ["trainer.epochs=2", *CPU]
    procs, results, folders = same_second([run, run], tmp_path, cli_env(data_dir), run_folders)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert len(folders) == 2, f"two runs started in the same second share a folder: {folders}"
    summaries = [read_summary(f) for f in folders]
    for folder, summary in zip(folders, summaries):
        assert summary["status"] == "completed"
        assert summary["run_dir"] == str(folder.resolve())
        assert epochs_of(folder) == [1, 2], folder
        last = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
        assert last["state"]["epoch"] == 2
        assert last["run_id"] == summary["run_id"]
    assert summaries[0]["run_id"] != summaries[1]["run_id"]
    assert {s["pid"] for s in summaries} == {p.pid for p in procs}
    assert all(s["host"] == socket.gethostname() for s in summaries)


@pytest.mark.slow
def test_two_sweeps_started_in_the_same_second_get_their_own_folders(tmp_path, data_dir):
    # The same sweep twice; the seeds tell the two sweeps' jobs apart.
    sweep = ["-m", "trainer.epochs=1", *CPU, "optimizer=sgd,adam"]
    _, results, folders = same_second([[*sweep, "trainer.seed=1"], [*sweep, "trainer.seed=2"]], tmp_path,
                                      cli_env(data_dir), sweep_folders)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert len(folders) == 2, f"two sweeps started in the same second share a folder: {folders}"
    seeds = set()
    for folder in folders:
        jobs = json.loads((folder / "sweep_summary.json").read_text())["jobs"]
        assert [j["job"] for j in jobs] == ["0", "1"], jobs
        (seed,) = {o for j in jobs for o in j["overrides"] if o.startswith("trainer.seed=")}
        seeds.add(seed)
        assert [sorted(j["overrides"]) for j in jobs] == [
            sorted(["trainer.epochs=1", *CPU, f"optimizer={opt}", seed]) for opt in ("sgd", "adam")
        ]
        assert all(j["status"] == "completed" for j in jobs)
        for job in ("0", "1"):
            summary = read_summary(folder / job)
            assert summary["status"] == "completed"
            assert Path(summary["run_dir"]).parent == folder.resolve()
            assert sorted(summary["overrides"]) == sorted(jobs[int(job)]["overrides"])
    assert seeds == {"trainer.seed=1", "trainer.seed=2"}


# ------------------------------------------------------------------ 8c: an explicit folder holding a run


def test_an_explicit_run_dir_holding_a_run_is_refused_but_resumable(cli, tmp_path):
    # a run made by the command, with the .hydra/ record that the refused command must leave alone
    cli("dlrun", "hydra.run.dir=run", "trainer.epochs=1", *CPU, check=True)
    run = tmp_path / "run"
    before = snapshot(run)

    ran = cli("dlrun", "hydra.run.dir=run", "trainer.epochs=1", *CPU)
    assert_refused(ran, "holds another run")
    assert snapshot(run) == before

    ran = cli("dlrun", "resume=run")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert read_summary(run)["status"] == "completed"
    assert epochs_of(run) == [1]


# ------------------------------------------------------------------ 9: one process per run folder


@pytest.mark.slow
def test_a_running_folder_cannot_be_resumed_by_another_process(cli, tmp_path, data_dir):
    # The resume is refused in this process within a second of the first checkpoint; the running
    # run's 4 epochs after that keep it alive well past the refusal.
    run = tmp_path / "run"
    epochs = 5
    first = start(["hydra.run.dir=run", f"trainer.epochs={epochs}", "trainer.batch_size=8", *CPU], tmp_path,
                  cli_env(data_dir))
    try:
        wait_for(lambda: (run / "checkpoints" / "last.pt").is_file(), first, "its first checkpoint")
        assert_refused(cli("dlrun", "resume=run"), "in use")
        assert first.poll() is None, "the first run ended before the resume was refused: make it longer"
        _, err = first.communicate(timeout=300)
    finally:
        stop_all([first])
    assert first.returncode == 0, err[-3000:]
    assert read_summary(run)["status"] == "completed"
    assert epochs_of(run) == list(range(1, epochs + 1))


@pytest.mark.slow
def test_two_resumes_at_once_one_wins(tmp_path, data_dir):
    # The winner's remaining epochs must outlast the lag between the two resumes taking the folder's lock.
    env = cli_env(data_dir)
    run = tmp_path / "run"
    epochs = 8
    proc = start(["hydra.run.dir=run", f"trainer.epochs={epochs}", "trainer.batch_size=8", *CPU], tmp_path, env)
    try:
        wait_for(lambda: has_epoch(run), proc, "it could be interrupted")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        stop_all([proc])
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert read_summary(run)["status"] == "interrupted"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["epoch"] < epochs

    procs = start_together([["resume=run"], ["resume=run"]], tmp_path, env)
    try:
        results = finish(procs)
    finally:
        stop_all(procs)
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], "two resumes of one folder at once: exit statuses %s\n%s" % (
        [code for code, _, _ in results], "\n---\n".join(err[-2000:] for _, _, err in results))
    assert_refused(next(r for r in results if r[0] == 1), "in use")
    assert read_summary(run)["status"] == "completed"
    assert epochs_of(run) == list(range(1, epochs + 1))


# ------------------------------------------------------------------ 10: killed between two checkpoint writes

VAL_LOSS = ["trainer.monitor=val/loss", *CPU]


def straight_val_loss(trained, epochs: int) -> Path:
    """The uninterrupted run monitored by val/loss, whose every epoch must write both checkpoints."""
    run = trained(f"trainer.epochs={epochs}", *VAL_LOSS)
    losses = [m["val/loss"] for m in read_metrics(run)]
    assert len(losses) == epochs and all(b < a for a, b in zip(losses, losses[1:])), (
        f"val/loss must improve at every epoch, so that every epoch writes last.pt and best.pt: {losses}")
    assert read_summary(run)["best"]["epoch"] == epochs
    return run


@pytest.mark.slow
@pytest.mark.parametrize("epochs,kill_after", [(3, 5), (2, 3)], ids=["epoch3", "epoch2"])
def test_killed_between_the_two_checkpoint_writes_resumes_to_the_uninterrupted_result(
        trained, cli, tmp_path, data_dir, epochs, kill_after):
    # Each epoch improves val/loss, so each writes both checkpoints (2 replaces an epoch): the kill
    # comes right after the first of the two writes of the last epoch.
    straight = straight_val_loss(trained, epochs)
    sentinel = tmp_path / "hook-notes"
    env = hook_env(tmp_path, cli_env(data_dir), DLRUN_TEST_KILL_AFTER=str(kill_after),
                   DLRUN_TEST_HOOK_SENTINEL=str(sentinel))
    run = tmp_path / "run"
    proc = start([f"hydra.run.dir={run}", f"trainer.epochs={epochs}", *VAL_LOSS], tmp_path, env)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        stop_all([proc])
    assert sentinel.is_file() and f"{proc.pid} kill-hook" in sentinel.read_text(), "the kill hook was not imported"
    assert proc.returncode == -signal.SIGKILL, f"the kill hook did not fire (exit {proc.returncode}):\n{err[-3000:]}"

    ran = cli("dlrun", f"resume={run}")
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary, want = read_summary(run), read_summary(straight)
    assert summary["status"] == "completed"
    assert summary["best"] == want["best"]
    assert summary["final"] == want["final"]
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(straight))
    for name in ("best.pt", "last.pt"):
        assert same_weights(run / "checkpoints" / name, straight / "checkpoints" / name), name


# ------------------------------------------------------------------ 11: a checkpoint from another run


def test_resume_refuses_a_checkpoint_from_another_run(trained, cli, tmp_path):
    # a run made by the command, with the .hydra/ record that the refused resume must leave alone
    cli("dlrun", "hydra.run.dir=cnn", "trainer.epochs=1", *CPU, check=True)
    other = trained("model=mlp", "model.hidden=[16]", "trainer.epochs=1", *CPU)  # another model, another run id
    cnn = tmp_path / "cnn"
    shutil.copy2(other / "checkpoints" / "last.pt", cnn / "checkpoints" / "last.pt")
    before = snapshot(cnn)

    assert_refused(cli("dlrun", f"resume={cnn}"), "does not belong")
    assert snapshot(cnn) == before


def test_a_resume_refused_for_a_foreign_best_checkpoint_changes_nothing(trained, cli, tmp_path):
    """A refused resume changes nothing: a best.pt from another run is refused before the completed run's
    summary is touched (it used to be rewritten as failed, its results gone)."""
    cli("dlrun", "hydra.run.dir=cnn", "trainer.epochs=1", *CPU, check=True)
    other = trained("model=mlp", "model.hidden=[16]", "trainer.epochs=1", *CPU)
    cnn = tmp_path / "cnn"
    shutil.copy2(other / "checkpoints" / "best.pt", cnn / "checkpoints" / "best.pt")
    before = snapshot(cnn)
    assert_refused(cli("dlrun", f"resume={cnn}", "trainer.epochs=2"), "best.pt does not belong")
    assert snapshot(cnn) == before and read_summary(cnn)["status"] == "completed"


@pytest.mark.parametrize("entry", ["metrics.jsonl", "dlrun.log", "plots", "checkpoints", ".hydra"])
def test_nothing_is_written_through_a_link_out_of_the_run_folder(trained, cli, tmp_path, entry):
    """A link inside a run folder that leads out of it is refused by every command that writes there
    (a resume appends to metrics.jsonl and dlrun.log, writes checkpoints and .hydra/resume-*; the tools
    write plots/), and the place it leads to is left as it was."""
    run = tmp_path / "run"
    shutil.copytree(trained("trainer.epochs=1", *CPU), run)
    outside = tmp_path / "outside"
    target = run / entry
    if target.is_dir():
        shutil.copytree(target, outside)
        shutil.rmtree(target)
    elif target.exists():
        shutil.copy2(target, outside)
        target.unlink()
    else:
        outside.mkdir()
    target.symlink_to(outside, target_is_directory=outside.is_dir())
    before = {p: p.read_bytes() for p in sorted(outside.rglob("*")) if p.is_file()} if outside.is_dir() else \
        outside.read_bytes()
    for command, args, prog in (("dlrun", [f"resume={run}", "trainer.epochs=2"], "dlrun"),
                                ("dlrun-report", [run], "dlrun-report"),
                                ("dlrun-explain", [run, "--examples", "2"], "dlrun-explain")):
        ran = cli(command, *args)
        assert ran.returncode == 1 and "Traceback" not in ran.stderr, ran.stderr
        assert ran.stderr.strip().splitlines()[-1].startswith(f"{prog}: error: {target} is a symbolic link to"), \
            ran.stderr
    after = {p: p.read_bytes() for p in sorted(outside.rglob("*")) if p.is_file()} if outside.is_dir() else \
        outside.read_bytes()
    assert after == before


@pytest.mark.parametrize("folder,words", [("", "hydra.run.dir is empty"),
                                          ("mine", "holds files that are not a dlrun run's (notes.txt)")])
def test_a_run_is_written_into_a_folder_of_its_own(cli, tmp_path, folder, words):
    """`hydra.run.dir=` (empty: the working directory) or a folder of the user's files: refused, nothing written."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert_refused(cli("dlrun", f"hydra.run.dir={folder}", "trainer.epochs=1", *CPU), words)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------ 12: dead processes never show as running


@pytest.mark.slow
def test_a_killed_parallel_sweep_worker_leaves_no_running_job(cli, tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = start(["-m", "launcher=local_parallel", "hydra.launcher.n_jobs=2", "trainer.seed=0,1,2,3",
                  "trainer.epochs=300", "trainer.batch_size=8", *CPU, "hydra.sweep.dir=sweep"], tmp_path,
                 cli_env(data_dir))
    try:
        def both_running() -> bool:
            return all((sweep / j / "summary.json").is_file() and read_summary(sweep / j)["status"] == "running"
                       and has_epoch(sweep / j) for j in ("0", "1"))

        wait_for(both_running, proc, "both jobs were training")
        pid = read_summary(sweep / "0").get("pid")
        if pid is None:  # a summary without the owner's pid: the worker process that holds job 0's files open
            pid = process_using(sweep / "0", children(proc.pid))
        assert pid is not None and pid != proc.pid, f"job 0's process was not found (got {pid})"
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        stop_all([proc])
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-3000:]

    killed, other = read_summary(sweep / "0"), read_summary(sweep / "1")
    assert killed["status"] == "failed" and killed.get("error"), killed
    assert other["status"] in ("failed", "interrupted", "completed"), other
    if other["status"] != "completed":
        assert other.get("error"), other
    report = cli("dlrun-report", sweep)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "running" not in report.stdout, report.stdout
    # the jobs the pool never started are in the sweep summary and in the one line too
    rows = {row["job"]: row for row in json.loads((sweep / "sweep_summary.json").read_text())["jobs"]}
    assert sorted(rows) == ["0", "1", "2", "3"], rows
    assert rows["2"]["status"] == rows["3"]["status"] == "not started"
    assert rows["3"]["overrides"] == ["launcher=local_parallel", "trainer.seed=3", "trainer.epochs=300",
                                      "trainer.batch_size=8", *CPU]
    assert rows["2"]["error"].startswith("the parallel sweep stopped before this job started (TerminatedWorkerError")
    line = err.strip().splitlines()[-1]
    assert line.startswith("dlrun: 4 of 4 jobs did not complete: #0 (") and "#2 not started (" in line, err[-2000:]
    assert "#3 not started (launcher=local_parallel trainer.seed=3 " in line


def test_an_interrupted_sweep_started_again_keeps_continues_and_starts_its_jobs(cli, tmp_path, data_dir, trained):
    """SIGTERM while job 1 of three trains: job 0 completed, job 1 interrupted with a checkpoint, job 2 never
    started. The same command again keeps job 0 as it is, continues job 1 from its checkpoint (ending where an
    uninterrupted run does) and runs job 2, and says so in one line. Another command into the same folder is
    refused before anything runs."""
    args = ["-m", "hydra.sweep.dir=sweep", "optimizer=sgd,adam,rmsprop", "trainer.epochs=8", *CPU]
    sweep = tmp_path / "sweep"
    proc = start(args, tmp_path, cli_env(data_dir))
    try:
        wait_for(lambda: (sweep / "1" / "checkpoints" / "last.pt").is_file(), proc, "job 1's first checkpoint")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        stop_all([proc])
    assert read_summary(sweep / "0")["status"] == "completed" and read_summary(sweep / "1")["status"] == "interrupted"
    assert not (sweep / "2").exists()
    kept = {k: v for k, v in snapshot(sweep / "0").items() if not k.startswith(".hydra")}  # Hydra rewrites .hydra/

    again = cli("dlrun", *args)
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in snapshot(sweep / "0").items() if not k.startswith(".hydra")} == kept  # not run again
    continued = read_summary(sweep / "1")
    assert continued["status"] == "completed" and len(continued["resumed"]) == 1
    assert epochs_of(sweep / "1") == list(range(1, 9))
    assert continued["final"] == pytest.approx(read_summary(trained("optimizer=adam", *args[3:]))["final"])
    assert read_summary(sweep / "2")["status"] == "completed"
    assert (f"dlrun: the sweep in sweep was started again: 1 job(s) completed earlier, kept (#0); 1 continued from "
            "their checkpoint or started again (#1); 1 new (#2)") in again.stderr.splitlines()

    other = cli("dlrun", "-m", "hydra.sweep.dir=sweep", "optimizer=sgd,adamw", "trainer.epochs=8", *CPU)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines() == [
        "dlrun: error: hydra.sweep.dir=sweep holds a sweep of other overrides (optimizer=sgd,adam,rmsprop "
        "trainer.epochs=8 device=cpu device.threads=1); a sweep is started again in its folder only with the same "
        "command (it keeps the jobs that completed and continues the others): give another hydra.sweep.dir"]


def test_report_does_not_show_running_for_a_dead_owner(trained, cli, tmp_path):
    run = shutil.copytree(trained("trainer.epochs=1", *CPU), tmp_path / "run")
    gone = int(Path("/proc/sys/kernel/pid_max").read_text())  # no process ever has this pid (pids stay below it)
    assert not pid_alive(gone)
    summary = read_summary(run)
    summary.update(status="running", pid=gone, host=socket.gethostname())
    for key in ("final", "best", "monitor_value", "train", "wall_time_s"):
        summary.pop(key, None)
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    report = cli("dlrun-report", run)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "running" not in report.stdout, report.stdout
    assert "failed" in report.stdout, report.stdout
