"""Checkpoints are written atomically and loaded with weights_only=True."""

from __future__ import annotations


import os
import signal
import subprocess
import sys

import pytest
import torch

from dlrun import checkpoint, rundir
from dlrun.errors import ConfigError


def test_roundtrip(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save({"model": model.state_dict(), "epoch": 3, "config": {"a": [1, 2]}}, path)
    loaded = checkpoint.load(path)
    assert loaded["epoch"] == 3 and loaded["config"] == {"a": [1, 2]}
    torch.testing.assert_close(loaded["model"]["weight"], model.weight)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_replace_keeps_the_old_file_until_the_new_one_is_complete(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {}, "epoch": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed between the temp write and the rename

    monkeypatch.setattr(rundir.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"model": {}, "epoch": 2}, path)
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the temp file is gone too


@pytest.mark.slow  # a process killed between the write and the rename
def test_killed_between_temp_write_and_rename(tmp_path):
    """A real SIGKILL in the window between writing the temp file and renaming it."""
    path = tmp_path / "last.pt"
    code = f"""
import os, signal, torch
from pathlib import Path
from dlrun import checkpoint, rundir
path = Path({str(path)!r})
checkpoint.save({{"model": {{"w": torch.zeros(3)}}, "epoch": 1}}, path)
rundir.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save({{"model": {{"w": torch.ones(3)}}, "epoch": 2}}, path)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    (tmp,) = tmp_path.glob(".last.pt.*.tmp")  # the new checkpoint was complete in its temp file
    assert torch.equal(torch.load(tmp, weights_only=True)["model"]["w"], torch.ones(3))
    loaded = checkpoint.load(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.zeros(3))


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded safely"):
        checkpoint.load(path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Evil()}, path)
    with pytest.raises(ConfigError, match="cannot be loaded safely"):
        checkpoint.load(path)


def test_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match="not a dlrun checkpoint"):
        checkpoint.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_atomic_writes_respect_the_umask(tmp_path):
    from dlrun.rundir import write_json

    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        checkpoint.save({"model": {}}, tmp_path / "b.pt")
    finally:
        os.umask(previous)
    assert [oct((tmp_path / name).stat().st_mode & 0o777) for name in ("a.json", "b.pt")] == ["0o644", "0o644"]
