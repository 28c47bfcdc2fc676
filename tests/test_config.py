"""Every option of every group composes against its schema and validates, with every value declared in conf/;
bad values name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dlrun.cli import config_dir
from dlrun.config.schema import GROUPS, with_current_keys
from dlrun.config.validate import resolve_monitor, validate
from dlrun.errors import ConfigError

SCHEMALESS = {("model", "custom")}  # open by design: the user's own keys
PRESET_GROUPS = {"debug", "experiment", "hparams_search", "launcher"}  # `# @package _global_` presets over the other groups
OPTIONS = sorted((p.parent.name, p.stem) for p in Path(config_dir()).glob("*/*.yaml")
                 if p.parent.name not in PRESET_GROUPS and (p.parent.name, p.stem) not in SCHEMALESS)
PRESETS = sorted((p.parent.name, p.stem) for p in Path(config_dir()).glob("*/*.yaml") if p.parent.name in PRESET_GROUPS)


def test_every_schema_has_its_yaml_option():
    assert {(group, name) for group, options in GROUPS.items() for name in options} <= set(OPTIONS)


@pytest.mark.parametrize("group,name", PRESETS)
def test_presets_compose_and_validate(make_cfg, group, name):
    cfg = make_cfg(f"{group}={name}")
    if "download" in cfg.dataset:  # the files are not here: a preset on them is checked to the point of loading
        cfg = make_cfg(f"{group}={name}", "dataset.download=true")
    if OmegaConf.is_interpolation(cfg.device, "threads"):  # follows hydra.launcher, known only in a job
        assert (group, name) in {("launcher", "local_parallel"), ("launcher", "slurm")}
    else:
        validate(cfg)


# options with a mandatory key, and those whose files are not here (checked up to loading them)
NEEDS = {("dataset", "imagefolder"): ["dataset.root=."],
         **{("dataset", name): ["dataset.download=true"] for name in ("mnist", "fashion_mnist", "cifar10", "cifar100")}}


@pytest.mark.parametrize("group,name", OPTIONS)
def test_option_composes_and_validates(make_cfg, group, name):
    import torch

    cfg = make_cfg(f"{group}={name}", *NEEDS.get((group, name), []))
    if (group, name) == ("device", "cuda") and not torch.cuda.is_available():  # refused before the run folder
        with pytest.raises(ConfigError, match="device=cuda was asked for, but torch finds no CUDA device"):
            validate(cfg)
    else:
        validate(cfg)
    # The YAML adds nothing a schema does not know: the node is typed by its dataclass (its own, or that of
    # the option it extends, e.g. device=cpu extends device=auto).
    assert OmegaConf.get_type(cfg[group]) is GROUPS[group].get(name) or OmegaConf.get_type(cfg[group]) in GROUPS[group].values()


def declared(group: str, name: str) -> set[str]:
    """The keys conf/<group>/<name>.yaml gives a value, its own and those of the options it extends."""
    values = OmegaConf.load(Path(config_dir()) / group / f"{name}.yaml")
    parents = [d for d in values.pop("defaults", []) if isinstance(d, str) and not d.startswith(("/", "_self_"))]
    return set(values.keys()).union(*(declared(group, parent) for parent in parents))


@pytest.mark.parametrize("group,name", OPTIONS)
def test_every_value_is_declared_in_conf(make_cfg, group, name):
    """Each default in one place, readable in conf/: the YAML option sets every key of its schema (the
    schema declares types and the `_target_` only), and a mandatory value (`???`) only where the user must
    choose it."""
    schema_keys = {k for k in OmegaConf.structured(OmegaConf.get_type(make_cfg(f"{group}={name}",
                                                                            *NEEDS.get((group, name), []))[group]))}
    assert schema_keys - {"_target_"} == declared(group, name), (group, name)


def test_a_config_saved_before_a_setting_existed_gets_todays_value():
    saved = OmegaConf.create({"trainer": {"epochs": 3}, "device": {"type": "cpu"}, "model": {"_target_": "x", "a": 1}})
    cfg = with_current_keys(saved)
    assert cfg.trainer.epochs == 3 and cfg.trainer.batch_size == 64 and cfg.trainer.distill.teacher is None
    assert cfg.device.type == "cpu" and cfg.device.threads == 0 and cfg.logger.plots is False
    assert OmegaConf.to_container(cfg.model) == {"_target_": "x", "a": 1}  # built groups stay as saved
    with pytest.raises(Exception, match="epoch"):
        with_current_keys(OmegaConf.create({"trainer": {"epoch": 3}}))


@pytest.mark.parametrize("overrides,key", [
    (["model=cnn", "model.blocks=[{channels:8}]"], "blocks"),
    (["model=cnn_blocks", "model.channels=[8]"], "channels"),
    (["model=cnn_blocks", "model.kernel_size=5"], "kernel_size"),
])
def test_channels_and_blocks_cannot_meet(make_cfg, overrides, key):
    """model=cnn has the `channels` shorthand and model=cnn_blocks the blocks: one config cannot hold both."""
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(*overrides)
    assert f"Key '{key}' not in" in str(err.value.__cause__ or err.value)


def test_a_block_gets_the_keys_it_leaves_out(make_cfg):
    (block,) = make_cfg("model=cnn_blocks", "model.blocks=[{channels:8,padding:valid}]").model.blocks
    assert OmegaConf.to_container(block, enum_to_str=True) == {
        "channels": 8, "kernel": 3, "stride": 1, "padding": "valid", "pool": "none", "pool_size": 2, "dropout": 0.0}


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
        (["device.threads=100000"], "device.threads=100000 is invalid: must be in 0 .. 1024"),  # it crashed
        (["+trainer.epoch=3"], "trainer.epoch is not a key of trainer (did you mean trainer.epochs?"),
        (["+trainer.early_stopping.patiense=3"], "trainer.early_stopping.patiense is not a key"),
        (["+optimizer.betaz=[0.9,0.99]"], "optimizer.betaz is not a key of optimizer (did you mean optimizer.betas?"),
        (["+dataset.crop=2"], "dataset.crop is not a key of dataset"),
        (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9] is invalid: must be two numbers in [0, 1)"),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5] is invalid"),
        (["optimizer=momentum", "optimizer.momentum=-1"], "optimizer.momentum=-1.0 is invalid: must be >= 0"),
        (["optimizer=rmsprop", "optimizer.alpha=-1"], "optimizer.alpha=-1.0 is invalid"),
        (["optimizer=adadelta", "optimizer.rho=2"], "optimizer.rho=2.0 is invalid: must be in [0, 1]"),
        (["scheduler=step", "scheduler.gamma=-1"], "scheduler.gamma=-1.0 is invalid: must be > 0"),  # it trained
        (["scheduler=plateau", "scheduler.factor=2"], "scheduler.factor=2.0 is invalid: must be in (0, 1)"),
        (["scheduler=onecycle", "scheduler.pct_start=0"], "scheduler.pct_start=0.0 is invalid"),
        (["dataset=mnist1d", "dataset.num_samples=0"], "dataset.num_samples=0 is invalid: must be a positive integer"),
        (["dataset=mnist1d", "dataset.train_split=1.5"], "dataset.train_split=1.5 is invalid: must be in (0, 1)"),
        (["dataset=sequence", "dataset.horizon=0"], "dataset.horizon=0 is invalid"),  # it trained on NaN losses
        (["dataset=sequence", "dataset.length=0"], "dataset.length=0 is invalid"),
        (["dataset=sequence", "dataset.num_sines=0"], "dataset.num_sines=0 is invalid"),
        (["dataset=sequence", "dataset.noise=-1"], "dataset.noise=-1.0 is invalid: must be >= 0"),
        (["dataset=sequence", "dataset.seed=-5"], "dataset.seed=-5 is invalid"),
        (["dataset.split_seed=-1"], "dataset.split_seed=-1 is invalid"),
        (["dataset=imagefolder", "dataset.root=.", "dataset.workers=-1"], "dataset.workers=-1 is invalid"),
        (["model=cnn_blocks", "+model.blocks.0.chanels=8"],  # in a list item too: refused before the run folder
         "model.blocks[0].chanels is not a key of model.blocks[0] (did you mean model.blocks[0].channels?"),
        (["trainer.distill.alpha=2"], "trainer.distill.alpha"),  # even without a teacher
        (["trainer.distill.temperature=0"], "trainer.distill.temperature"),
    ],
)
def test_validate_names_the_key(make_cfg, overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
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
