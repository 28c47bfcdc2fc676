"""The built wheel works installed, from another directory: it carries its configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CPU, read_summary

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_wheel_runs_from_another_directory(tmp_path, data_dir):
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("dlrun-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    assert (target / "dlrun" / "conf" / "config.yaml").is_file()
    # Hydra finds dlrun's sweeper and launchers through the wheel's entry points
    (entry_points,) = target.glob("dlrun-*.dist-info/entry_points.txt")
    plugins = entry_points.read_text().split("[hydra.plugins]")[1]
    for plugin in ("dlrun.hydra_ext.search:OptunaSweeper", "dlrun.hydra_ext.launchers:LocalLauncher",
                   "dlrun.hydra_ext.launchers:SlurmLauncher", "dlrun.hydra_ext.launchers:JoblibLauncher"):
        assert plugin in plugins

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH puts the installed copy ahead of the checkout's editable install.
    env = {**os.environ, "PYTHONPATH": str(target), "DLRUN_DATA_DIR": str(data_dir)}
    where = subprocess.run([sys.executable, "-c", "import dlrun.cli as c; print(c.__file__); print(c.config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(target)) for path in where), where

    proc = subprocess.run([sys.executable, "-m", "dlrun", "trainer.epochs=1", *CPU],
                          cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (run,) = list((elsewhere / "outputs").glob("*/*"))
    assert read_summary(run)["status"] == "completed"
