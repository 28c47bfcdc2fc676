"""Shared helpers: real Hydra composition; the commands run in this process as a user types them
(`cli`: exit status, stdout and stderr); real `dlrun` processes for what only a process shows
(`dlrun_cli`: signals, a killed process, torchrun, exit statuses set by the interpreter); and trained
runs made once per test session and shared by every file and pytest-xdist worker (`trained`).

The session's data dir is shared too (`DLRUN_DATA_DIR`), so generated datasets are built once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dlrun.cli import config_dir
from dlrun.config.schema import register_configs

# One torch thread in every test process and in the dlrun processes they start (set before torch is imported):
# pytest-xdist runs a worker per core, and two threads per worker would fight over the cores, making runs
# several times slower. A test about threads sets its own (device.threads, or an environment without this).
os.environ["OMP_NUM_THREADS"] = "1"

DLRUN = str(Path(sys.executable).with_name("dlrun"))
CPU = ("device=cpu", "device.threads=1")  # what most test runs add: one thread, so two xdist workers share the CPU


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id) -> Path:
    """One folder for the whole session, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (xdist workers) for the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> Path:
    """The session's data dir (generated and decoded datasets are cached there once)."""
    path = shared_dir / "data"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def session_env(data_dir) -> Iterator[None]:
    """DLRUN_DATA_DIR for every composed config and run of the session (Hydra resolves it when read)."""
    before = os.environ.get("DLRUN_DATA_DIR")
    os.environ["DLRUN_DATA_DIR"] = str(data_dir)
    register_configs()
    yield
    if before is None:
        os.environ.pop("DLRUN_DATA_DIR", None)
    else:
        os.environ["DLRUN_DATA_DIR"] = before


def compose_config(*overrides: str) -> DictConfig:
    """The real config from conf/ with overrides, as the CLI composes it."""
    with initialize_config_dir(config_dir=config_dir()):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    return compose_config


def model_of(*overrides: str, shape: tuple[int, ...] = (1, 8, 8), outputs: int = 10):
    """The model `dlrun <overrides>` builds for inputs of `shape` (every value not overridden from conf/)."""
    from dlrun.models import build_model

    return build_model(compose_config(*overrides).model, shape, outputs)


def loop_settings(task: str = "classification", *overrides: str, **changes):
    """`cfg.trainer` of `dlrun <overrides>` as the loop reads it, with `changes` on top."""
    from dlrun.train import LoopSettings

    return LoopSettings.of(compose_config(*overrides).trainer, task, **changes)


@pytest.fixture(scope="session")
def trained(shared_dir) -> Callable[..., Path]:
    """`trained(*overrides)`: the run folder of `run(compose(overrides))`, trained once per session: the
    first test (on any xdist worker) that asks for it trains it, the others wait for it and reuse it.
    Tests must not write into it; copy it (`shutil.copytree`) to change it."""
    from dlrun.run import run

    def get(*overrides: str) -> Path:
        key = hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:12]
        folder = shared_dir / "trained" / key
        folder.parent.mkdir(exist_ok=True)
        with locked(folder.parent / f"{key}.lock"):
            if not (folder / "summary.json").is_file():
                summary = run(compose_config(*overrides), run_dir=folder)
                assert summary["status"] == "completed", summary
            elif json.loads((folder / "summary.json").read_text())["status"] != "completed":
                pytest.fail(f"the shared run {overrides} failed earlier in this session")
        return folder

    return get


@dataclass
class Ran:
    """What a command run in this process did: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def exit_status(code: object, stderr: list[str]) -> int:
    """The exit status Python gives `SystemExit(code)`: a message is printed and means 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    stderr.append(f"{code}\n")
    return 1


COMMANDS = {  # console script -> its main (dlrun's reads sys.argv, as Hydra's apps do)
    "dlrun": "dlrun.cli:main",
    "dlrun-report": "dlrun.tools.report:main",
    "dlrun-predict": "dlrun.tools.predict:main",
    "dlrun-compress": "dlrun.tools.compress:main",
    "dlrun-explain": "dlrun.tools.explain:main",
    "dlrun-export": "dlrun.tools.export:main",
}


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys) -> Callable[..., Ran]:
    """`cli("dlrun", "trainer.epochs=1", ...)`: a command as typed, in this process, in `cwd` (default
    tmp_path); `check=True` fails the test on a non-zero status. Hydra's state and the logging it set up
    are reset afterwards, so that the next command (or a direct `run(cfg)`) starts clean."""
    from importlib import import_module

    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # restored after the test, whatever dlrun sets
    monkeypatch.setattr(sys, "path", list(sys.path))  # dlrun adds the working directory (import_user_code)

    def call(command: str, *args: str | Path, cwd: Path | None = None, check: bool = False) -> Ran:
        module, name = COMMANDS[command].split(":")
        main = getattr(import_module(module), name)
        argv = [str(a) for a in args]
        monkeypatch.chdir(cwd or tmp_path)
        monkeypatch.setattr(sys, "argv", [command, *argv])
        capsys.readouterr()
        extra: list[str] = []
        try:
            main() if command == "dlrun" else main(argv)
            code = 0
        except SystemExit as done:
            code = exit_status(done.code, extra)
        finally:
            HydraConfig.instance().cfg = None
            reset_logging()
        out, err = capsys.readouterr()
        ran = Ran(code, out, err + "".join(extra))
        if check and code != 0:
            raise AssertionError(f"{command} {' '.join(argv)} failed ({code}):\n{ran.stdout}\n{ran.stderr}")
        return ran

    return call


def reset_logging() -> None:
    """Close and remove the handlers a Hydra job added (its run's log file), as a new process would start."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.NullHandler) and type(handler).__module__.startswith("logging"):
            handler.close()
            root.removeHandler(handler)


@pytest.fixture
def dlrun_cli(data_dir, tmp_path):
    """Run the installed `dlrun` command in a subprocess, in a temp working directory: for what only a
    process shows (signals, exit statuses, a killed process)."""

    def _run(*args: str, cwd: Path | None = None, check: bool = False, timeout: float = 300,
             columns: int = 200) -> subprocess.CompletedProcess:
        env = {**os.environ, "DLRUN_DATA_DIR": str(data_dir), "COLUMNS": str(columns)}
        proc = subprocess.run(
            [DLRUN, *args], cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"dlrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return _run


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
