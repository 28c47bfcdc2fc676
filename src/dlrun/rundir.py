"""The run folder: its layout, the one atomic write, and who may write into it.

This module alone knows the names inside a run folder. Rules it enforces:

- every JSON file and checkpoint is written atomically (`atomic_write`: a unique temp file in
  the same folder, fsync, rename, fsync of the folder): readers never see a half-written file;
- one process owns a run folder at a time (`own`: an flock on `.dlrun.lock`, released by the
  kernel when the process ends, even by SIGKILL, so a crash never leaves it stuck);
- a fresh run gets a fresh folder (`claim_fresh`: an atomic mkdir, `-1`, `-2`, ... appended
  when another run took the name in the same second); a new run never starts in a folder that
  holds another run (`check_fresh`), and a resumed run only continues its own checkpoint
  (`check_belongs`);
- a summary says `running` only while its owner is alive (`read_summary` reports a run whose
  process is gone as failed; `settle` writes that down).

Imported by the Hydra plugins at every start: no torch here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from dlrun.errors import ConfigError, Interrupted, RunFolderError

SUMMARY = "summary.json"
# hydra.job.env_set key that names the sweep (worker process) which launched a job: the summary records it,
# so a worker sharing a study's folder with others reports on its own jobs only
SWEEP_ID = "DLRUN_SWEEP_ID"
LEARNING_CURVES, PARETO = "learning_curves.png", "pareto.png"  # in a run's plots/, or dlrun-report's --plots folder


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    summary = property(lambda self: self.path / SUMMARY)
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last = property(lambda self: self.checkpoints / "last.pt")
    best = property(lambda self: self.checkpoints / "best.pt")
    swa = property(lambda self: self.checkpoints / "swa.pt")  # trainer.swa_start
    top = property(lambda self: self.checkpoints / "top")  # trainer.save_top_k: epoch-NNNN.pt
    plots = property(lambda self: self.path / "plots")
    tensorboard = property(lambda self: self.path / "tensorboard")
    log = property(lambda self: self.path / "dlrun.log")
    model_summary = property(lambda self: self.path / "model_summary.txt")  # trainer.model_summary
    wandb = property(lambda self: self.path / "wandb")  # logger=wandb: W&B's own files (wandb.init(dir=run folder))
    hydra_config = property(lambda self: self.path / ".hydra" / "config.yaml")
    hydra_overrides = property(lambda self: self.path / ".hydra" / "overrides.yaml")
    variants = property(lambda self: self.path / "variants")
    compress_report = property(lambda self: self.path / "compress.json")
    learning_curves = property(lambda self: self.plots / LEARNING_CURVES)
    lr_find = property(lambda self: self.plots / "lr_find.png")  # trainer.lr_find
    confusion_matrix = property(lambda self: self.plots / "confusion_matrix.png")  # classification runs
    predicted_vs_true = property(lambda self: self.plots / "predicted_vs_true.png")  # regression runs
    misclassified = property(lambda self: self.plots / "misclassified.png")  # dlrun-explain
    explain_report = property(lambda self: self.path / "explain.json")  # dlrun-explain
    lock = property(lambda self: self.path / ".dlrun.lock")

    def variant(self, name: str, suffix: str = ".pt") -> Path:
        """dlrun-compress's file of a variant: .pt (a dlrun checkpoint), .onnx, .pt2 (a torch.export archive)."""
        return self.variants / f"{name}{suffix}"

    def top_epoch(self, epoch: int) -> Path:
        """trainer.save_top_k's checkpoint of one epoch."""
        return self.top / f"epoch-{epoch:04d}.pt"

    def top_files(self) -> dict[int, Path]:
        """trainer.save_top_k's checkpoints in the folder, by epoch."""
        return {int(p.stem.removeprefix("epoch-")): p for p in self.top.glob("epoch-*.pt")}

    def exported(self, suffix: str) -> Path:
        """dlrun-export's file in one format (its suffix: .onnx, .torchscript.pt, .pt2), beside its .json."""
        return self.path / "export" / f"model{suffix}"

    def attributions(self, method: str) -> Path:
        """dlrun-explain's picture of one attribution method."""
        return self.plots / f"attributions_{method}.png"

    def holds_run(self) -> bool:
        """Whether a run has started here (its record exists)."""
        return self.summary.is_file()

    def read_summary(self) -> dict[str, Any]:
        return read_summary(self.path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary, summary)


def sweep_summary(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "sweep_summary.json"


# ------------------------------------------------------------ the summary


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """A run's summary as the run goes: `running` (with the owning process's pid and host), then
    `completed`, `failed` or `interrupted`. Every change is written at once (atomically). With
    `write=False` (DDP ranks other than 0) it keeps nothing and writes nothing.

    A new run starts a new record with a fresh `run_id` (which its checkpoints carry too); a
    resumed run continues its record, keeps its `run_id`, drops the results of the earlier
    attempt and notes where it resumed.
    """

    STALE = ("error", "final", "best", "monitor_value", "train", "steps", "classes", "outputs", "baselines",
             "after_training_s")
    LAUNCHER = ("sweep_id", "elastic_run_id")  # who started the run: a resumed run records its latest start's

    def __init__(self, run_dir: RunDir, entries: dict[str, Any], resumed_at: dict[str, Any] | None = None,
                 run_id: str | None = None, write: bool = True) -> None:
        self.run_dir, self.write = run_dir, write
        self.summary: dict[str, Any] = {}
        if not write:
            return
        if resumed_at is not None and run_dir.holds_run():
            self.summary = load_summary(run_dir)
            for stale in self.STALE:
                self.summary.pop(stale, None)
            self.summary.setdefault("resumed", []).append({"at": now(), **resumed_at})
            self.summary.update({key: entries[key] for key in self.LAUNCHER if key in entries})
        else:
            self.summary = {"started_at": now(), **entries}
        self.update(status="running", run_id=run_id or self.summary.get("run_id") or uuid.uuid4().hex,
                    run_dir=str(run_dir.path.resolve()), pid=os.getpid(), host=socket.gethostname())

    @property
    def run_id(self) -> str | None:
        return self.summary.get("run_id")

    def update(self, **entries: Any) -> None:
        if self.write:
            self.summary.update(entries)
            self.run_dir.write_summary(self.summary)

    def fail(self, err: BaseException, **entries: Any) -> None:
        """Record how the run ended early: `interrupted` (a signal, Ctrl-C, a launcher ending the
        job to requeue it) or `failed`, with the error (if the summary can still be written)."""
        stopped = isinstance(err, (KeyboardInterrupt, Interrupted, SystemExit))
        if isinstance(err, Interrupted):
            entries["steps"] = err.step
        if isinstance(err, (KeyboardInterrupt, Interrupted)):  # the signal, for the exit status of a sweep
            entries["signal"] = signal.Signals(getattr(err, "signum", signal.SIGINT)).name
        try:
            self.update(status="interrupted" if stopped else "failed", error=f"{type(err).__name__}: {err}", **entries)
        except RunFolderError as unwritten:  # the disk is full: the error itself still reaches the user
            logging.getLogger("dlrun").warning("%s", unwritten)


# ------------------------------------------------------------------ writing


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(file)` into a temp file beside `path`, fsync, rename over `path`, fsync the folder.

    A crash at any moment leaves the previous file or the new one, never a torn one; the temp
    name is unique, so two writers never trip over each other's temp file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    except OSError as err:  # a read-only file system, a full disk, no permission
        raise RunFolderError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        # disk full, file too large, read-only (torch.save reports it as a RuntimeError raised
        # while handling the OSError): one line; the previous file stays
        failed = next((e for e in _chain(err) if isinstance(e, OSError)), None)
        if failed is not None:
            raise RunFolderError(f"cannot write {path}: {failed.strerror or failed}") from None
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """An exception and those it was raised from or while handling."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def write_bytes(path: Path, data: bytes) -> Path:
    """`data` as the file at `path`, written atomically (its folder made if need be)."""
    atomic_write(path, lambda f: f.write(data))
    return path


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write (O_APPEND): a reader sees whole lines only."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


# ---------------------------------------------------------------- ownership


def _in_use(run_dir: RunDir) -> RunFolderError:
    """The refusal for a folder another live process owns, naming that process."""
    try:
        who = json.loads(run_dir.lock.read_text())
        holder = f"pid {who['pid']} on {who['host']}"
    except (OSError, ValueError, KeyError):
        holder = "an unknown process"
    return RunFolderError(f"{run_dir.path} is in use by another dlrun process ({holder}); "
                          "wait for it to end, or use another folder")


@contextmanager
def own(run_dir: RunDir) -> Iterator[None]:
    """Hold the run folder's lock for the block; a clear error if another live process holds it, or if the
    folder holds a link out of it (`check_links`)."""
    try:
        run_dir.path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot write into {run_dir.path}: {err.strerror or err}") from None
    check_links(run_dir)
    try:
        fd = os.open(run_dir.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:  # a read-only file system; ELOOP: the lock file is a symbolic link
        raise RunFolderError(f"{run_dir.lock} cannot be used as the run's lock ({err.strerror or err}); dlrun "
                             "writes into its run folders: give a writable one") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(run_dir) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def is_owned(run_dir: RunDir) -> bool | None:
    """Whether a live process holds the folder's lock (None: the folder has no lock file)."""
    try:
        fd = os.open(run_dir.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def check_not_in_use(run_dir: RunDir) -> None:
    if is_owned(run_dir):
        raise _in_use(run_dir)


def check_links(run_dir: RunDir) -> None:
    """Refuse a run folder holding a symbolic link that leads out of it: dlrun appends to, and writes into,
    the files and folders of a run folder (metrics.jsonl, dlrun.log, plots/, checkpoints/, .hydra/, ...), and
    writing through such a link would change files elsewhere. (The folder itself may be a link. W&B's folder,
    `wandb/`, is W&B's own: it links its logs to ~/.cache/wandb, and dlrun writes nothing into it.)"""
    if not run_dir.path.is_dir():
        return
    inside = run_dir.path.resolve()
    for entry in sorted(run_dir.path.rglob("*")):
        if entry.is_relative_to(run_dir.wandb):
            continue
        if entry.is_symlink() and not entry.resolve().is_relative_to(inside):
            raise RunFolderError(f"{entry} is a symbolic link to {entry.resolve()}, outside the run folder; dlrun "
                                 "writes only inside a run folder: replace the link with the file or folder itself")


def process_alive(pid: int, host: str | None) -> bool | None:
    """Whether process `pid` exists (None: it runs on another host, so this cannot tell)."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------ fresh folders


def claim_fresh(path: Path) -> Path:
    """Create `path` as a new folder, or `path-1`, `path-2`, ... if another run has the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = path if n == 0 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RunFolderError(f"no free folder name next to {path}")


def check_own(run_dir: RunDir, key: str = "hydra.run.dir") -> None:
    """A run is written into a folder of its own: an explicit output folder that exists must be empty, or
    hold what dlrun (and Hydra for it) wrote there, never other files it would be scattered among."""
    if not run_dir.path.is_dir() or run_dir.holds_run():
        return
    others = sorted(p.name for p in run_dir.path.iterdir()
                    if p.name not in (".hydra", run_dir.log.name, run_dir.lock.name))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise RunFolderError(f"{key}={run_dir.path} holds files that are not a dlrun run's ({shown}); a run is "
                             "written into a folder of its own: choose a new or empty folder")


def check_fresh(run_dir: RunDir, key: str = "hydra.run.dir") -> None:
    """A new run may not start in a folder that holds another run: one that completed, or one that can be
    continued (it wrote checkpoints/last.pt). A run that ended before that (bad input, a job killed at start
    and requeued, a kill between its first best.pt and its first last.pt) may be started again in its
    folder, which it then begins afresh (its metrics file emptied, its best.pt rewritten)."""
    if not run_dir.holds_run():
        return
    status = read_summary(run_dir.path).get("status")
    if run_dir.last.is_file() or status == "completed":
        raise RunFolderError(f"{key}={run_dir.path} holds another run ({status}); "
                             f"continue it with resume={run_dir.path}, or choose another folder")


# ----------------------------------------------------------------- resuming


def resume_checkpoint(folder: str | Path) -> Path:
    """The checkpoint that `resume=<folder>` continues from; a clear error if there is none."""
    run_dir = RunDir(Path(folder).expanduser().resolve())
    if run_dir.path.is_file():
        raise ConfigError(f"resume={folder}: a file; resume= takes the run folder (here {run_dir.path.parents[1]}, "
                          "if it is a run's checkpoint)")
    if not run_dir.path.is_dir():
        raise ConfigError(f"resume={folder}: no such run folder")
    if not run_dir.last.is_file():
        raise ConfigError(f"resume={folder}: {run_dir.last} does not exist ({_why_no_checkpoint(run_dir)})")
    return run_dir.last


def _why_no_checkpoint(run_dir: RunDir) -> str:
    if not run_dir.holds_run():
        return "no dlrun run was started in this folder"
    if run_dir.hydra_config.is_file():
        saved = read_yaml(run_dir.hydra_config)
        if isinstance(saved, dict) and (saved.get("trainer") or {}).get("save_checkpoints") is False:
            return "the run was started with trainer.save_checkpoints=false"
    return (f"the run ended before it wrote a checkpoint to continue from ({read_summary(run_dir.path).get('status')});"
            " start it again with its own command")


def check_belongs(run_dir: RunDir, ckpt: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint written by another run than the folder's own.

    Checkpoints and summaries carry the run's `run_id`; where one of them was written before
    dlrun recorded it, the checkpoint's config is compared with the folder's (model and dataset)."""
    summary = load_summary(run_dir) if run_dir.holds_run() else {}
    ours, theirs = summary.get("run_id"), ckpt.get("run_id")
    if ours is not None and theirs is not None:
        foreign = ours != theirs
    else:
        foreign = not _same_model_and_data(run_dir, ckpt.get("config", {}))
    if foreign:
        raise RunFolderError(f"{path} does not belong to the run in {run_dir.path} (it was written by another run); "
                             "copy it back or resume the run it came from")


def _same_model_and_data(run_dir: RunDir, config: dict[str, Any]) -> bool:
    if not run_dir.hydra_config.is_file():
        return True  # nothing to compare with
    saved = read_yaml(run_dir.hydra_config)
    if not isinstance(saved, dict):
        return False
    return (saved.get("model") == config.get("model")
            and saved.get("dataset", {}).get("_target_") == config.get("dataset", {}).get("_target_"))


# A process started again by its launcher: torchrun's elastic agent (--max-restarts) or Slurm (a requeue: a node
# failed, the job was preempted, `scontrol requeue`) runs the same command, which continues the run it began.
RESTART_COUNTS = {"TORCHELASTIC_RESTART_COUNT": "torchrun", "SLURM_RESTART_COUNT": "Slurm"}
ELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"  # torchrun's rendezvous id: the same in every restart of one torchrun


def restarted() -> str | None:
    """Who started this process again, and how often ("torchrun restart 1"); None for a first start."""
    for variable, launcher in RESTART_COUNTS.items():
        count = os.environ.get(variable, "0")
        if count.isdigit() and int(count) > 0:
            return f"{launcher} restart {count}"
    return None


def continues_after_restart(run_dir: RunDir) -> bool:
    """Whether this process, started again, continues the run in `run_dir`: one that can be continued (it wrote
    checkpoints/last.pt) and has not completed."""
    return (restarted() is not None and run_dir.last.is_file()
            and read_summary(run_dir.path).get("status") != "completed")


def earlier_sweep_job(run_dir: RunDir, overrides: list[str]) -> str | None:
    """What a sweep job finds in its folder from an earlier start of the same sweep (`hydra.sweep.dir` given
    again, or the job requeued): "completed" (nothing to do), "cut off" (continue from its last.pt), or None
    (nothing to go on from: start). A run of other overrides there is refused: the sweep is not the same."""
    if not run_dir.holds_run():
        return None
    summary = read_summary(run_dir.path)
    if summary.get("overrides") != overrides:
        raise RunFolderError(f"{run_dir.path} holds a run of other overrides ({' '.join(summary.get('overrides') or [])})"
                             "; a sweep continues in its folder only with the same command: give another "
                             "hydra.sweep.dir")
    if summary.get("status") == "completed":
        return "completed"
    return "cut off" if run_dir.last.is_file() else None


def elastic_run(root: Path) -> Path | None:
    """The run under `root` that this torchrun began before it restarted (its summary names this rendezvous id):
    a timestamped run folder has another name in every restart. None when torchrun's id names no single run
    (`--rdzv-id` left at its default "none": give one, or use --standalone)."""
    run_id = os.environ.get(ELASTIC_RUN_ID)
    if not run_id or run_id == "none" or not root.is_dir():
        return None
    runs = [p for p in find_runs([str(root)]) if read_summary(p).get("elastic_run_id") == run_id]
    return runs[-1] if len(runs) == 1 and continues_after_restart(RunDir(runs[-1])) else None


# ------------------------------------------------------------------ reading


def read_yaml(path: Path) -> Any:
    """A YAML file of a run folder (Hydra's record), as plain data with its `${...}` left unresolved: a file
    someone else may have written is read, never evaluated. One that is not plain YAML (a python tag, a
    syntax error) is a one-line error naming it."""
    import yaml
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (yaml.YAMLError, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RunFolderError(f"{path} is not a plain YAML file ({first}); dlrun reads only what Hydra wrote") from None


def read_summary(folder: str | Path) -> dict[str, Any]:
    """A run's summary; a run recorded as `running` whose process is gone reads as `failed`."""
    run_dir = RunDir(Path(folder))
    summary = load_summary(run_dir)
    if summary.get("status") == "running" and not _alive(run_dir, summary):
        summary["status"] = "failed"
        summary["error"] = (f"the process that ran it (pid {summary.get('pid')} on {summary.get('host')}) "
                            "ended without recording an end (killed?)")
    return summary


def load_summary(run_dir: RunDir) -> dict[str, Any]:
    """The run's summary.json as written; one that is not a JSON object (damaged, or not dlrun's) is a
    one-line error naming it."""
    try:
        summary = json.loads(run_dir.summary.read_text())
    except ValueError as err:
        raise RunFolderError(f"{run_dir.summary} is not valid JSON ({err}); damaged? (dlrun rewrites it whole)") from None
    if not isinstance(summary, dict):
        raise RunFolderError(f"{run_dir.summary} holds a {type(summary).__name__}, not a dlrun summary")
    return summary


def _alive(run_dir: RunDir, summary: dict[str, Any]) -> bool:
    owned = is_owned(run_dir)
    if owned is not None:
        return owned
    if "pid" in summary:  # no lock file: go by the process id
        return process_alive(summary["pid"], summary.get("host")) is not False
    return True  # written before dlrun recorded its process: cannot tell


def settle(folder: str | Path) -> dict[str, Any]:
    """Write down what `read_summary` found: a run whose process is gone is recorded as failed."""
    run_dir = RunDir(Path(folder))
    summary = read_summary(run_dir.path)
    if summary.get("status") == "failed" and load_summary(run_dir).get("status") == "running":
        with suppress(RunFolderError), own(run_dir):  # a process that took it over meanwhile writes its own
            run_dir.write_summary(summary)
    return summary


def read_metrics(run_dir: RunDir) -> list[dict[str, Any]]:
    """The run's epoch records; a line that is not one is a one-line error naming the file and line."""
    if not run_dir.metrics.is_file():
        return []
    records = []
    for number, line in enumerate(run_dir.metrics.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RunFolderError(f"{run_dir.metrics} line {number} is not an epoch record (damaged?); "
                                 "repair or remove that line")
        records.append(record)
    return records


def find_runs(folders: list[str]) -> list[Path]:
    """Run folders (with a summary) given directly or found under sweep folders, in job order."""
    runs: list[Path] = []
    for folder in map(Path, folders):
        if RunDir(folder).holds_run():
            runs.append(folder)
        else:  # a sweep: its numbered job folders, in numeric order
            runs += sorted((p.parent for p in folder.rglob(SUMMARY)),
                           key=lambda p: (str(p.parent), len(p.name), p.name))
    return runs
