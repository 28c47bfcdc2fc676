"""Opening a checkpoint or a run folder never runs code it names.

A config saved in a checkpoint may name only dlrun's own builders (exact names) and plain values;
code outside dlrun (a `model=custom` class) runs only with the user's consent on the command line.
Each payload below is written into a real run folder's checkpoints and fed to every command that
reads one: nothing may run (the sentinel file never appears), and the answer is one line.
"""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CPU, read_summary
from dlrun.checkpoint import load_model
from dlrun.compress import Plan
from dlrun.errors import ConfigError
from dlrun.run import run
from dlrun.tools.variants import compress, load_variant

MLP = ("model=mlp", "model.hidden=[16]", "trainer.epochs=1", *CPU)  # the session's shared run these tests poison


class Pickled:
    """A pickle that would write the sentinel when unpickled."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (exec, (f"open({self.sentinel!r}, 'w').write('pwned')",))


def payloads(where: Path, sentinel: Path) -> dict[str, tuple[str, dict]]:
    """name -> (the config group it replaces, the replacement)."""
    write = f"open({str(sentinel)!r}, 'w').write('pwned')"
    (where / "evil.pkl").write_bytes(pickle.dumps(Pickled(sentinel)))
    (where / "hub").mkdir(exist_ok=True)
    (where / "hub" / "hubconf.py").write_text(f"{write}\ndef x(**kw):\n    return None\n")
    (where / "evilmod.py").write_text(write + "\n")
    code_cache = {"_target_": "torch._inductor.codecache.PyCodeCache.load", "source_code": write}
    cnn = {"_target_": "dlrun.models.CNN", "kernel_size": 3, "pool": "max", "batch_norm": True, "dropout": 0.1,
           "hidden": 128}
    made = {
        "torch.load": ("dataset", {"_target_": "torch.load", "f": str(where / "evil.pkl"), "weights_only": False}),
        "code_cache": ("dataset", code_cache),
        "nested_in_cnn": ("model", {**cnn, "channels": code_cache}),
        "torch.hub.load": ("model", {"_target_": "torch.hub.load", "repo_or_dir": str(where / "hub"), "model": "x",
                                     "source": "local"}),
        "os.system": ("model", {"_target_": "os.system", "command": f"touch {sentinel}"}),
        "builtins.exec": ("dataset", {"_target_": "builtins.exec", "_args_": [write]}),
        "import_module": ("dataset", {"_target_": "importlib.import_module", "name": "evilmod"}),
        "subprocess.run": ("model", {"_target_": "subprocess.run", "args": ["touch", str(sentinel)]}),
        "args_on_a_builder": ("model", {**cnn, "_args_": [code_cache]}),
        "interpolation": ("optimizer", {"_target_": "torch.optim.Adam", "lr": "${oc.env:HOME}"}),
    }
    assert list(made) == NAMES
    return made


@pytest.fixture(scope="module")
def with_variant(trained, tmp_path_factory) -> Path:
    """A real run folder (checkpoints, summary) with a variant of its model: a copy of the shared run, which
    must not be written into, with the dynamic int8 variant load_variant opens."""
    run_dir = tmp_path_factory.mktemp("security") / "run"
    shutil.copytree(trained(*MLP), run_dir)
    compress(run_dir, Plan(prune=[], quantize=["dynamic"], half=False, onnx=False), log=lambda line: None)
    return run_dir


def poisoned(with_variant: Path, tmp_path: Path, group: str, replacement: dict) -> Path:
    """A copy of the run folder whose checkpoints (and variants) carry the payload in their config."""
    run_dir = tmp_path / "shared_run"
    shutil.copytree(with_variant, run_dir)
    for path in [*run_dir.glob("checkpoints/*.pt"), *run_dir.glob("variants/*.pt")]:
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"][group] = replacement
        torch.save(ckpt, path)
    return run_dir


NAMES = ["torch.load", "code_cache", "nested_in_cnn", "torch.hub.load", "os.system", "builtins.exec", "import_module",
         "subprocess.run", "args_on_a_builder", "interpolation"]


@pytest.mark.parametrize("name", NAMES)
def test_no_payload_runs_in_process(with_variant, tmp_path, make_cfg, monkeypatch, name):
    sentinel = tmp_path / "sentinel"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    group, replacement = payloads(tmp_path, sentinel)[name]
    run_dir = poisoned(with_variant, tmp_path, group, replacement)
    before = (run_dir / "summary.json").read_bytes()
    attempts = {
        "resume": lambda: run(OmegaConf.merge(make_cfg(), {"resume": str(run_dir)})),
        "predict": lambda: load_model(run_dir),
        "compress": lambda: compress(run_dir, Plan(prune=[], quantize=[], half=False, onnx=False), log=lambda s: None),
        "load_variant": lambda: load_variant(run_dir / "variants" / "int8-dynamic.pt"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(ConfigError) as refused:
            attempt()
        message = str(refused.value)
        assert "\n" not in message and ("not allowed in a saved config" in message or "plain values" in message
                                        or "outside dlrun's builders" in message), (what, message)
        assert not sentinel.exists(), f"{name} ran through {what}"
    assert (run_dir / "summary.json").read_bytes() == before  # the refused resume wrote nothing


@pytest.mark.parametrize("name", ["nested_in_cnn", "os.system"])
@pytest.mark.parametrize("command", ["resume", "predict", "predict --evaluate", "compress"])
def test_no_payload_runs_through_the_commands(with_variant, cli, tmp_path, name, command):
    sentinel = tmp_path / "sentinel"
    group, replacement = payloads(tmp_path, sentinel)[name]
    run_dir = poisoned(with_variant, tmp_path, group, replacement)
    before = (run_dir / "summary.json").read_bytes()
    (tmp_path / "x.pt").write_bytes(b"")
    argv = {
        "resume": ["dlrun", f"resume={run_dir}"],
        "predict": ["dlrun-predict", run_dir, tmp_path / "x.pt"],
        "predict --evaluate": ["dlrun-predict", run_dir, "--evaluate"],
        "compress": ["dlrun-compress", run_dir],
    }[command]
    ran = cli(*argv)
    assert ran.returncode == 1, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error:" in lines[0], ran.stderr
    assert any(why in lines[0] for why in ("outside dlrun's builders", "not allowed in a saved config")), lines[0]
    assert not sentinel.exists()
    assert (run_dir / "summary.json").read_bytes() == before  # nothing was written into the folder


@pytest.fixture
def user_module(tmp_path, monkeypatch, request) -> Path:
    """The user's model, mynet.py, in the working directory (tmp_path), where the commands find it. The
    commands run in this process: it forgets the module and the path they added afterwards (sys.modules,
    sys.path), as their own processes would have."""
    (tmp_path / "mynet.py").write_text(
        "import math\nfrom torch import nn\n\n"
        "class MyNet(nn.Sequential):\n"
        "    def __init__(self, in_shape, num_outputs, width=8):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.ReLU(),\n"
        "                         nn.Linear(width, num_outputs))\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    request.addfinalizer(lambda: sys.modules.pop("mynet", None))
    return tmp_path


def test_user_code_in_a_checkpoint_needs_consent(cli, user_module):
    cli("dlrun", "hydra.run.dir=run", "model=custom", "model._target_=mynet.MyNet", "+model.width=8",
        "trainer.epochs=1", *CPU, check=True)  # a `model=custom` run: its checkpoints name the user's class

    refused = cli("dlrun-predict", "run", "--evaluate")
    assert refused.returncode == 1 and refused.stderr.strip() == (
        "dlrun-predict: error: run/checkpoints/best.pt names code outside dlrun's builders "
        "(model._target_=mynet.MyNet); load it only if you trust it, with --trust mynet.MyNet")
    trusted = cli("dlrun-predict", "run", "--evaluate", "--trust", "mynet.MyNet")
    assert trusted.returncode == 0, trusted.stderr
    assert f"acc {read_summary(user_module / 'run')['best']['test/acc']:.4f}" in trusted.stdout

    refused = cli("dlrun", "resume=run")
    assert refused.returncode == 1 and "with dlrun resume=run model._target_=mynet.MyNet" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    resumed = cli("dlrun", "resume=run", "model._target_=mynet.MyNet")  # its own override, named again
    assert resumed.returncode == 0, resumed.stderr
    assert read_summary(user_module / "run")["status"] == "completed"


def test_a_checkpoint_without_a_config_or_with_foreign_weights_is_one_line(trained, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"model": {}}, bare)
    with pytest.raises(ConfigError, match=r"holds no dlrun config \(not written by dlrun\?\)"):
        load_model(bare)
    foreign = tmp_path / "foreign.pt"
    ckpt = torch.load(trained(*MLP) / "checkpoints" / "best.pt", weights_only=True)
    ckpt["model"] = {"weight": torch.zeros(2)}
    torch.save(ckpt, foreign)
    with pytest.raises(ConfigError, match=r"its weights do not fit the model its config describes \(Error"):
        load_model(foreign)


def test_a_corrupt_checkpoint_never_suggests_loading_it_unsafely(tmp_path):
    from dlrun import checkpoint

    path = tmp_path / "last.pt"
    path.write_bytes(pickle.dumps(Pickled(tmp_path / "sentinel")))
    with pytest.raises(ConfigError) as refused:
        checkpoint.load(path)
    assert str(refused.value) == (f"checkpoint {path} cannot be loaded safely: it is not a dlrun checkpoint, "
                                  "or it is damaged (UnpicklingError)")
    assert not (tmp_path / "sentinel").exists()
