"""Bad input to `dlrun` fails with one line that names the key and what is allowed: exit status 1,
no traceback, and nothing already written is lost (a failure in the Hydra callback writes nothing).

The command runs in this process (`cli`); a process of its own only shows that an unset value is
refused before torch is imported. The rest checks the same rules directly: `dir_problem`, the
unset-value check, the seed and split-fraction rules, a data dir that cannot be written, and caches
that cannot be read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CPU, Ran
from dlrun.config.validate import dir_problem, validate
from dlrun.errors import ConfigError
from dlrun.hydra_ext import callbacks


def assert_one_line_error(ran: Ran, *expected: str) -> str:
    """Exit status 1 and exactly one non-empty stderr line, `dlrun: error: ...`, holding each of `expected`."""
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert ran.returncode == 1, ran.stderr
    assert "Traceback" not in ran.stderr and "Traceback" not in ran.stdout, ran.stderr
    assert len(lines) == 1, ran.stderr
    assert lines[0].startswith("dlrun: error: "), lines[0]
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------ the CLI matrix

# (arguments, what the one line must hold, whether the failure comes before Hydra makes a folder)
CASES = [
    pytest.param(["hydra.run.dir=/proc/x"], ["hydra.run.dir=/proc/x", "cannot be used as the output folder", "/proc"],
                 True, id="run-dir-in-proc"),
    pytest.param(["-m", "hydra.sweep.dir=/proc/x"], ["hydra.sweep.dir=/proc/x", "cannot be used as the output folder"],
                 True, id="sweep-dir-in-proc"),
    pytest.param(["model=custom"], ["model._target_ is not set", "model._target_=my_pkg.MyNet"], True,
                 id="custom-model-without-target"),
    pytest.param(["-m", "model=custom"], ["model._target_ is not set", "model._target_=my_pkg.MyNet"], True,
                 id="sweep-custom-model-without-target"),
    pytest.param(["dataset=imagefolder"], ["dataset.root is not set", "dataset.root=/path/to/images"], True,
                 id="imagefolder-without-root"),
    pytest.param(["model=custom", "dataset=imagefolder"], ["model._target_ is not set", "dataset.root is not set"],
                 True, id="two-unset-values"),
    pytest.param(["trainer.seed=-1"], ["trainer.seed=-1", "0 .. 4294967295"], False, id="seed-negative"),
    pytest.param(["trainer.seed=18446744073709551616"], ["trainer.seed=18446744073709551616", "0 .. 4294967295"],
                 False, id="seed-2**64"),
    pytest.param(["dataset.test_fraction=0.999"],
                 ["dataset.val_fraction + dataset.test_fraction = 1.099 is invalid: must be < 1",
                  "val_fraction=0.1", "test_fraction=0.999"], False, id="fractions-sum"),
    pytest.param(["dataset=imagefolder", "dataset.root=/nonexistent"], ["dataset.root='/nonexistent'",
                                                                        "no such directory"],
                 False, id="imagefolder-root-missing"),
]


@pytest.mark.parametrize("args,expected,before_hydra", CASES)
def test_bad_input_is_one_line_naming_the_key(cli, tmp_path, args, expected, before_hydra):
    assert_one_line_error(cli("dlrun", *CPU, *args), *expected)
    if before_hydra:  # refused in the callback: no run or sweep folder was made
        assert not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------ unset values: before torch

NO_TORCH = '''
"""Test hook (tests/test_bad_config_input.py): `import torch` fails, and every attempt is noted."""
import os
import sys

_NOTES = os.environ["DLRUN_TEST_TORCH_NOTES"]


def _note(line):
    with open(_NOTES, "a") as f:
        f.write(line + "\\n")


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            _note(f"import {name}")
            raise ImportError(f"test hook: {name} must not be imported")
        return None


sys.meta_path.insert(0, _NoTorch())
_note("loaded")
'''


def no_torch(tmp_path: Path, monkeypatch) -> Path:
    """Put the NO_TORCH hook first on PYTHONPATH (as sitecustomize.py) for subprocesses; returns its notes file."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_TORCH)
    notes = tmp_path / "torch-notes"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("DLRUN_TEST_TORCH_NOTES", str(notes))
    return notes


UNSET = [(["model=custom"], "model._target_"), (["dataset=imagefolder"], "dataset.root"),
         (["-m", "model=custom"], "model._target_")]


@pytest.mark.slow
def test_unset_values_fail_before_torch_is_imported(tmp_path, monkeypatch):
    """Whether torch is imported is the interpreter's to say: a process with the hook runs `dlrun` for
    each unset value in turn, then imports torch itself (so the hook is shown to see an import)."""
    notes = no_torch(tmp_path, monkeypatch)
    code = (
        "import sys\n"
        "from dlrun.cli import main\n"
        f"for args in {[args for args, _ in UNSET]!r}:\n"
        f"    sys.argv = ['dlrun', *{list(CPU)!r}, *args]\n"
        "    try:\n        main()\n    except SystemExit as done:\n        print(done.code)\n"
        "import torch\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert "must not be imported" in proc.stderr  # the script's own import, at the end
    refusals = proc.stdout.splitlines()
    assert len(refusals) == len(UNSET), proc.stdout + proc.stderr
    for line, (_, key) in zip(refusals, UNSET):
        assert line.startswith("dlrun: error: ") and f"{key} is not set" in line, line
    assert notes.read_text().splitlines() == ["loaded", "import torch"]  # torch was asked for only by the script


@pytest.mark.parametrize("args,key", UNSET)
def test_an_unset_value_is_refused_before_anything_is_written(cli, tmp_path, args, key):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    run_dir = [] if "-m" in args else ["hydra.run.dir=keep"]
    assert_one_line_error(cli("dlrun", *CPU, *run_dir, *args), f"{key} is not set")
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["notes.txt"]  # no .hydra/, log or summary added


def test_a_swept_value_is_not_unset(cli, tmp_path):
    """`-m model._target_=a.B,c.D` sets the key in each job: the sweep starts (its jobs then fail to import)."""
    ran = cli("dlrun", *CPU, "-m", "model=custom", "model._target_=no_such_pkg.A,no_such_pkg.B", "trainer.epochs=1")
    assert "is not set" not in ran.stderr
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1 and {p.name for p in sweeps[0].iterdir()} >= {"0", "1"}
    assert (sweeps[0] / "sweep_summary.json").is_file()  # a sweep that started is still summarised
    assert ran.returncode == 1 and "2 of 2 jobs did not complete" in ran.stderr


def test_unset_keys_outside_hydra(make_cfg):
    assert callbacks.unset_keys(make_cfg()) == []
    assert callbacks.unset_keys(make_cfg("model=custom", "dataset=imagefolder")) == ["model._target_", "dataset.root"]
    cfg = OmegaConf.create({"a": {"b": "???", "c": ["???", 1], "d": "${a.b}"}, "hydra": {"x": "???"}})
    assert callbacks.unset_keys(cfg) == ["a.b", "a.c[0]"]


def test_check_set_names_the_key_and_how_to_set_it(make_cfg):
    with pytest.raises(ConfigError, match=r"^model\._target_ is not set: .*model\._target_=my_pkg\.MyNet"):
        callbacks.check_set(make_cfg("model=custom"), "run")
    with pytest.raises(ConfigError, match=r"^dataset\.root is not set: .*dataset\.root=/path/to/images"):
        callbacks.check_set(make_cfg("dataset=imagefolder"), "run")
    with pytest.raises(ConfigError, match=r"^a\.b is not set: .*a\.b=<value>"):
        callbacks.check_set(OmegaConf.create({"a": {"b": "???"}}), "run")
    callbacks.check_set(make_cfg(), "run")


@pytest.mark.parametrize("task,params,refused", [
    (["model=custom"], None, True),
    (["model=custom", "model._target_=a.B,c.D"], None, False),  # swept: each job sets it
    (["model=custom"], {"model._target_": "choice(a.B, c.D)"}, False),  # set by the sweeper's params
    (["model=cnn,custom"], None, False),  # a swept group: its keys are the jobs' business
    (["model=custom", "optimizer.lr=0.1,0.2"], None, True),
])
def test_check_set_in_a_sweep_skips_what_the_sweep_sets(task, params, refused):
    cfg = OmegaConf.create({"model": {"_target_": "???"},
                            "hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}})
    if refused:
        with pytest.raises(ConfigError, match="model._target_ is not set"):
            callbacks.check_set(cfg, "sweep")
    else:
        callbacks.check_set(cfg, "sweep")


# ------------------------------------------------------------------ output folders


def test_dir_problem_of_a_folder_that_cannot_be_made(tmp_path):
    assert "/proc" in dir_problem("/proc/x") and "/proc" in dir_problem("/proc/x/y/z")
    (tmp_path / "file").write_text("")
    assert "is a file" in dir_problem(tmp_path / "file" / "x")
    assert dir_problem(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # a check creates nothing


def test_dir_problem_reads_the_filesystem(tmp_path, monkeypatch):
    """A read-only mount is refused even where os.access says writable (root); a filesystem that
    reports no storage is tried with a probe folder, which is removed again."""
    real = os.statvfs

    def fake(flag=0, blocks=1000):
        def statvfs(path):
            s = real(path)
            return os.statvfs_result((s.f_bsize, s.f_frsize, blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                                      s.f_favail, s.f_flag | flag, s.f_namemax))
        return statvfs

    monkeypatch.setattr(os, "statvfs", fake(flag=os.ST_RDONLY))
    assert "read-only filesystem" in dir_problem(tmp_path / "x")
    monkeypatch.setattr(os, "statvfs", fake(blocks=0))
    assert dir_problem(tmp_path / "x") is None
    assert list(tmp_path.iterdir()) == []  # the probe is gone


# ------------------------------------------------------------------ validate


@pytest.mark.parametrize("seed,ok", [(0, True), (2**32 - 1, True), (-1, False), (2**32, False), (2**64, False)])
def test_seed_range(make_cfg, seed, ok):
    cfg = make_cfg(f"trainer.seed={seed}")
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match=rf"^trainer\.seed={seed} is invalid: must be in 0 \.\. 4294967295"):
            validate(cfg)


def test_fractions_name_both_keys_and_values(make_cfg):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("dataset.test_fraction=0.999"))
    assert str(err.value) == ("dataset.val_fraction + dataset.test_fraction = 1.099 is invalid: must be < 1 "
                              "(val_fraction=0.1, test_fraction=0.999)")


# ------------------------------------------------------------------ data dirs and caches

MNIST1D = dict(num_samples=400, train_split=0.8, val_fraction=0.1, split_seed=0, generator_seed=42)


@pytest.fixture
def mnist1d_dir(tmp_path_factory):
    """A data dir holding a generated MNIST-1D cache (once per test: the tests corrupt it)."""
    from dlrun.data import load_mnist1d

    folder = tmp_path_factory.mktemp("mnist1d-data")
    load_mnist1d(str(folder), **MNIST1D)
    return folder


def read_only(monkeypatch, folder: Path) -> None:
    """Make os.access report `folder` and everything in it as not writable. (The tests run as root,
    for whom chmod does not stop writes and os.access says writable; a read-only mount needs
    privileges they do not have. So this is a simulation of what a user without write access sees.)"""
    real = os.access

    def access(path, mode, *args, **kwargs):
        inside = Path(path).resolve().is_relative_to(folder.resolve())
        return False if inside and mode & os.W_OK else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def without_the_generator(monkeypatch) -> None:
    """As if the mnist1d package were not installed: a load that generates the data fails with ImportError."""
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)


def test_a_read_only_data_dir_with_the_cache_is_used(make_cfg, mnist1d_dir, monkeypatch):
    from dlrun.data import load_mnist1d

    before = load_mnist1d(str(mnist1d_dir), **MNIST1D)
    (cache,) = (mnist1d_dir / "mnist1d").glob("*.npz")
    written = cache.stat()
    read_only(monkeypatch, mnist1d_dir)
    validate(make_cfg("dataset=mnist1d", f"dataset.data_dir={mnist1d_dir}"))  # not refused up front
    without_the_generator(monkeypatch)  # the cache must be used
    again = load_mnist1d(str(mnist1d_dir), **MNIST1D)
    np.testing.assert_array_equal(before.test[0], again.test[0])
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # not rewritten


def test_a_read_only_data_dir_without_the_cache_names_the_key(mnist1d_dir, monkeypatch):
    from dlrun.data import load_mnist1d

    files = sorted(mnist1d_dir.rglob("*"))
    read_only(monkeypatch, mnist1d_dir)
    without_the_generator(monkeypatch)  # refused before generating what could not be kept
    with pytest.raises(ConfigError, match=rf"^dataset\.data_dir={mnist1d_dir} .*is not writable"):
        load_mnist1d(str(mnist1d_dir), **{**MNIST1D, "generator_seed": 7})  # another cache file
    assert sorted(mnist1d_dir.rglob("*")) == files


def test_validate_still_refuses_a_data_dir_that_is_a_file(make_cfg, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^dataset\.data_dir=.*is a file"):
        validate(make_cfg("dataset=mnist1d", f"dataset.data_dir={tmp_path / 'file'}"))


CORRUPTIONS = {
    "garbage": lambda b: b"not an npz file at all" * 10,
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "bit-flip": lambda b: b[:-300] + bytes(x ^ 0xFF for x in b[-300:-200]) + b[-200:],
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_a_corrupt_mnist1d_cache_is_rebuilt(mnist1d_dir, caplog, corrupt):
    from dlrun.data import load_mnist1d

    (cache,) = (mnist1d_dir / "mnist1d").glob("*.npz")
    good = load_mnist1d(str(mnist1d_dir), **MNIST1D)
    cache.write_bytes(CORRUPTIONS[corrupt](cache.read_bytes()))
    with caplog.at_level("WARNING", logger="dlrun.data"):
        again = load_mnist1d(str(mnist1d_dir), **MNIST1D)
    np.testing.assert_array_equal(good.test[0], again.test[0])
    np.testing.assert_array_equal(good.train[1], again.train[1])
    assert any(str(cache) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    with np.load(cache) as f:  # written again, whole
        assert set(f.files) == {"x", "y", "x_test", "y_test"}


def test_a_corrupt_torchvision_cache_is_rebuilt(tmp_path, caplog):
    from datafiles import write_mnist
    from dlrun.data import load_mnist

    write_mnist(tmp_path, n_train=100, n_test=50)
    good = load_mnist(str(tmp_path), download=False, val_fraction=0.1, split_seed=0)
    (cache,) = (tmp_path / "dlrun-cache").glob("mnist-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="dlrun.data"):
        again = load_mnist(str(tmp_path), download=False, val_fraction=0.1, split_seed=0)
    np.testing.assert_array_equal(good.test[0], again.test[0])
    assert any("cannot be read" in r.getMessage() for r in caplog.records)


def test_missing_torchvision_files_are_named_before_the_cache_write(tmp_path, monkeypatch):
    """A data dir that can be neither read (no files) nor written: the missing files are the news."""
    from dlrun.data import load_mnist

    read_only(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="missing: .*MNIST/raw/train-images-idx3-ubyte"):
        load_mnist(str(tmp_path), download=False, val_fraction=0.1, split_seed=0)
