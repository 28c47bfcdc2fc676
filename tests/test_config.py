"""Every option of every group composes against its schema and validates; bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dlrun.cli import config_dir
from dlrun.config.schema import GROUPS
from dlrun.config.validate import resolve_monitor, validate
from dlrun.errors import ConfigError

OPTIONS = [(group, name) for group, options in GROUPS.items() for name in options]


SCHEMALESS = {("model", "custom")}  # open by design: the user's own keys
PRESET_GROUPS = {"debug", "experiment", "hparams_search", "launcher"}  # `# @package _global_` presets over the other groups


def test_every_yaml_option_has_a_schema_and_vice_versa():
    on_disk = {(p.parent.name, p.stem) for p in Path(config_dir()).glob("*/*.yaml")}
    assert {o for o in on_disk if o[0] not in PRESET_GROUPS} == set(OPTIONS) | SCHEMALESS


PRESETS = sorted((p.parent.name, p.stem) for p in Path(config_dir()).glob("*/*.yaml") if p.parent.name in PRESET_GROUPS)


@pytest.mark.parametrize("group,name", PRESETS)
def test_presets_compose_and_validate(make_cfg, group, name):
    cfg = make_cfg(f"{group}={name}")
    if OmegaConf.is_interpolation(cfg.device, "threads"):  # follows hydra.launcher, known only in a job
        assert (group, name) in {("launcher", "local_parallel"), ("launcher", "slurm")}
    else:
        validate(cfg)


NEEDS = {("dataset", "imagefolder"): ["dataset.root=."]}  # options with a mandatory key


@pytest.mark.parametrize("group,name", OPTIONS)
def test_option_composes_and_validates(make_cfg, group, name):
    cfg = make_cfg(f"{group}={name}", *NEEDS.get((group, name), []))
    validate(cfg)
    # The YAML adds nothing the schema does not know: the node is typed by its dataclass.
    assert OmegaConf.get_type(cfg[group]) is GROUPS[group][name]


def test_defaults(make_cfg):
    cfg = make_cfg()
    assert cfg.model._target_ == "dlrun.models.CNN"
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.dataset._target_ == "dlrun.data.load_digits"
    assert cfg.device.type == "auto"


def test_device_options_set_their_type(make_cfg):
    assert make_cfg("device=cpu").device.type == "cpu"
    assert make_cfg("device=cuda").device.type == "cuda"


def test_momentum_is_nesterov_sgd(make_cfg):
    opt = make_cfg("optimizer=momentum").optimizer
    assert opt._target_ == "torch.optim.SGD" and opt.momentum == 0.9 and opt.nesterov is True


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.cell=foo", "expected one of [rnn, lstm, gru]"),
        ("trainer.epochs=abc", "could not be converted to Integer"),
        ("trainer.epoch=3", "Key 'epoch' not in 'TrainerConfig'"),
    ],
)
def test_schema_rejects_bad_keys_and_types(make_cfg, override, message):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("model=rnn", override)
    assert message in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optimizer.lr=0"], "optimizer.lr"),
        (["optimizer.lr=-1e-3"], "optimizer.lr"),
        (["trainer.epochs=0"], "trainer.epochs"),
        (["trainer.batch_size=-4"], "trainer.batch_size"),
        (["model.dropout=1.0"], "model.dropout"),
        (["model=rnn", "model.dropout=-0.1"], "model.dropout"),
        (["model.channels=[]"], "model.channels"),
        (["trainer.monitor=val/f1"], "trainer.monitor"),
        (["dataset=imagefolder", "dataset.root=/no/such/folder"], "dataset.root"),
        (["dataset=imagefolder", "dataset.root=.", "dataset.channels=2"], "dataset.channels"),
        (["dataset=imagefolder", "dataset.root=.", "dataset.image_size=[32]"], "dataset.image_size"),
        (["dataset=cifar10", "dataset.crop_padding=-1"], "dataset.crop_padding"),
        (["dataset.val_fraction=0.5", "dataset.test_fraction=0.6"], "dataset.val_fraction"),
        (["device.threads=-1"], "device.threads"),
    ],
)
def test_validate_names_the_key(make_cfg, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(make_cfg(*overrides))


@pytest.mark.parametrize(
    "monitor,mode,task,expected",
    [
        ("auto", "auto", "classification", ("val/acc", "max")),
        ("auto", "auto", "regression", ("val/loss", "min")),
        ("val/loss", "auto", "classification", ("val/loss", "min")),
        ("val/mae", "auto", "regression", ("val/mae", "min")),
        ("val/loss", "max", "classification", ("val/loss", "max")),
        ("train/acc", "min", "classification", ("train/acc", "min")),
    ],
)
def test_resolve_monitor(make_cfg, monitor, mode, task, expected):
    cfg = make_cfg(f"trainer.monitor={monitor}", f"trainer.monitor_mode={mode}")
    assert resolve_monitor(cfg.trainer, task) == expected


@pytest.mark.parametrize("monitor,task", [("val/acc", "regression"), ("val/mae", "classification")])
def test_monitor_must_match_the_task(make_cfg, monitor, task):
    with pytest.raises(ConfigError, match="trainer.monitor"):
        resolve_monitor(make_cfg(f"trainer.monitor={monitor}").trainer, task)
