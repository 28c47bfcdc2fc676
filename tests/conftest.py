"""Shared helpers: real Hydra composition and real `dlrun` subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dlrun.cli import config_dir
from dlrun.config.schema import register_configs

DLRUN = str(Path(sys.executable).with_name("dlrun"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data dir for the session, so generated datasets are built once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(data_dir, monkeypatch):
    """Compose the real config from conf/ with overrides, as the CLI would."""
    monkeypatch.setenv("DLRUN_DATA_DIR", str(data_dir))
    register_configs()

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=config_dir()):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def dlrun_cli(data_dir, tmp_path):
    """Run the installed `dlrun` command in a subprocess, in a temp working directory."""

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
