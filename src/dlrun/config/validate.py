"""Range and cross-field rules that types cannot express, checked before any tensor exists.

Each failure names the key, the value and what is allowed (`ConfigError`). Torch-free, but for the
check that device=cuda has a CUDA device (only asked then; the run imports torch a moment later).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import secrets
import typing
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from dlrun.config.schema import (GROUPS, MNIST1D_LENGTH, SETTINGS, ConvBlockConfig, MonitorMode, OnNonFinite,
                                 TrainerConfig, score_name)
from dlrun.errors import ConfigError, require_extra
from dlrun.rundir import RunDir, read_yaml

SEED_MAX = 2**32 - 1  # numpy.random.seed's largest seed
MAX_THREADS = 1024  # more CPU threads than any machine has cores; 100,000 made the process run out of memory
SEQUENCE = "dlrun.data.load_sequence"  # the regression dataset (a forecast)
MNIST1D = "dlrun.data.load_mnist1d"  # signals (1, 40)


def resolve_monitor(trainer: DictConfig | TrainerConfig, task: str) -> tuple[str, str]:
    """The monitored metric (`auto`: val/acc, or val/loss for regression) and `max` or `min`
    (`monitor_mode: auto` decides by the name: accuracy is maximised, losses and errors minimised)."""
    monitor = trainer.monitor
    if monitor == "auto":
        monitor = "val/loss" if task == "regression" else "val/acc"
    metric = monitor.rsplit("/", 1)[-1]
    reported = ("loss", score_name(task))
    if metric not in reported:
        raise ConfigError(f"trainer.monitor={monitor!r} is invalid: a {task} dataset reports {', '.join(reported)}")
    mode = MonitorMode(trainer.monitor_mode)
    return monitor, mode.value if mode is not MonitorMode.auto else ("max" if metric == "acc" else "min")


def check_search_direction(direction: Any, monitor: str, mode: str) -> None:
    """An Optuna sweep (`hydra.sweeper.direction`) must rank trials the way the run ranks its epochs."""
    expected = "maximize" if mode == "max" else "minimize"
    if isinstance(direction, str) and direction != expected:
        raise ConfigError(
            f"hydra.sweeper.direction={direction} does not match the monitored metric: {monitor} is "
            f"{'maximised' if mode == 'max' else 'minimised'} (trainer.monitor); set hydra.sweeper.direction={expected}"
        )


def check_data_parallel(trainer: DictConfig, world: int, n_train: int | None = None) -> None:
    """What DDP over `world` ranks needs: no skipped batches, and a shard for every rank in every
    batch (checked once the number of training samples, `n_train`, is known)."""
    _require(trainer.devices in (1, world), "trainer.devices", f"must be 1 or {world} (torchrun's world size)",
             trainer.devices)
    _require(OnNonFinite(trainer.on_nonfinite) is OnNonFinite.stop, "trainer.on_nonfinite",
             f"must be stop with {world} processes (a batch skipped on one rank only would stall the others)",
             OnNonFinite(trainer.on_nonfinite).value)
    _require(trainer.batch_size >= world, "trainer.batch_size", f"must be >= {world} (a sample per process)",
             trainer.batch_size)
    if n_train is None:
        return
    tail = n_train % trainer.batch_size
    _require(tail == 0 or tail >= world,
             "trainer.batch_size", f"must give every one of the {world} processes at least one sample of every "
             f"batch ({n_train} training samples leave a last batch of {tail})", trainer.batch_size)


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {rule}")


def validate(cfg: DictConfig, resumed: bool = False) -> None:
    """Range and cross-field rules, checked before any tensor exists. `resumed`: the config of a run that continues
    from its checkpoint (the model's pretrained weights are in it: their file is not needed again)."""
    for group in ("model", "optimizer", "scheduler", "dataset", "device", "trainer", "logger"):
        validate_keys(cfg.get(group), group)
    validate_trainer(cfg.trainer)
    for key in ("mixup", "cutmix"):
        _require(not cfg.trainer[key] or cfg.dataset.get("_target_") != SEQUENCE, f"trainer.{key}",
                 "mixes class labels: it needs a classification dataset (dataset=sequence is regression)",
                 cfg.trainer[key])
    _require(not cfg.trainer.cutmix or cfg.dataset.get("_target_") != MNIST1D, "trainer.cutmix",
             "CutMix pastes boxes between images; MNIST-1D's inputs are signals (trainer.mixup works on them)",
             cfg.trainer.cutmix)
    if cfg.trainer.get("distill") is not None:
        validate_distill(cfg.trainer.distill, cfg.dataset)
    validate_numbers(cfg.optimizer, "optimizer", OPTIMIZER_RULES)
    validate_numbers(cfg.scheduler, "scheduler", SCHEDULER_RULES)
    validate_model(cfg.model, resumed)
    _require(cfg.model.get("_target_") != TIMM or cfg.dataset.get("_target_") not in (SEQUENCE, MNIST1D), "model",
             "timm's architectures take images (C, H, W); this dataset's inputs are signals or sequences", "timm")
    _require(not cfg.trainer.freeze_epochs or cfg.model.get("_target_") == TIMM, "trainer.freeze_epochs",
             "trains a pretrained model's classifier alone first: it needs model=timm", cfg.trainer.freeze_epochs)
    validate_dataset(cfg.dataset)
    _require(0 <= cfg.device.threads <= MAX_THREADS, "device.threads",
             f"must be in 0 .. {MAX_THREADS} (0 keeps torch's default)", cfg.device.threads)
    validate_device(cfg.device)
    validate_files(cfg.dataset)
    validate_logger(cfg.logger)


def validate_logger(logger: DictConfig) -> None:
    """The trackers' extras are installed (a missing one is one line naming it), W&B's mode is known."""
    if logger.get("mlflow"):
        require_extra("mlflow", ("mlflow",), "logger=mlflow")
    if logger.get("wandb"):
        _require(logger.wandb_mode in ("offline", "online"), "logger.wandb_mode",
                 "allowed: offline (files in the run folder, `wandb sync` later), online", logger.wandb_mode)
        require_extra("wandb", ("wandb",), "logger=wandb")


# The optimizer's and scheduler's numbers (the keys each option has, in conf/), so that torch's own refusal,
# after the run folder is made, is not the first word on them: key -> (rule, what it says).
Rule = tuple[Callable[[float], bool], str]
POSITIVE: Rule = (lambda v: v > 0, "must be > 0")
AT_LEAST_0: Rule = (lambda v: v >= 0, "must be >= 0")
SHARE: Rule = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
OPEN_SHARE: Rule = (lambda v: 0 < v < 1, "must be in (0, 1)")
OPTIMIZER_RULES: dict[str, Rule] = {
    "lr": POSITIVE, "weight_decay": AT_LEAST_0, "eps": AT_LEAST_0, "momentum": AT_LEAST_0, "dampening": SHARE,
    "alpha": AT_LEAST_0, "rho": SHARE, "betas": (lambda v: 0 <= v < 1, "must be two numbers in [0, 1)")}
SCHEDULER_RULES: dict[str, Rule] = {
    "step_epochs": (lambda v: v >= 1, "must be >= 1"), "gamma": POSITIVE, "min_lr_ratio": SHARE,
    "pct_start": OPEN_SHARE, "div_factor": POSITIVE, "final_div_factor": POSITIVE, "factor": OPEN_SHARE,
    "patience": AT_LEAST_0, "threshold": AT_LEAST_0, "min_lr": AT_LEAST_0}


def validate_numbers(node: DictConfig, group: str, rules: dict[str, Rule]) -> None:
    for key, (ok, rule) in rules.items():
        if key in node:
            value = node[key]
            values = list(value) if OmegaConf.is_list(value) else [value]
            _require(all(ok(v) for v in values) and (key != "betas" or len(values) == 2), f"{group}.{key}", rule,
                     values if OmegaConf.is_list(value) else value)


def validate_keys(node: Any, where: str) -> None:
    """Only the keys of a node's schema: a key added with Hydra's `+` (as its own error message suggests for a
    misspelt one) would otherwise be carried along and do nothing. A node without a schema (model=custom, whose
    keys its class checks) takes any key."""
    if OmegaConf.is_list(node):  # model.blocks: a schema per item
        for i, item in enumerate(node):
            validate_keys(item, f"{where}[{i}]")
        return
    schema = OmegaConf.get_type(node) if OmegaConf.is_dict(node) else None
    if not dataclasses.is_dataclass(schema):
        return
    known = [f.name for f in dataclasses.fields(schema)]
    for key, value in node.items_ex(resolve=False):  # unresolved: a value may follow Hydra's job config
        if key not in known:
            raise unknown_key(where, str(key), known)
        validate_keys(value, f"{where}.{key}")


def unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {where}.{close[0]}? " if close else ""
    return ConfigError(f"{where}.{key} is not a key of {where} ({hint}its keys: "
                       f"{', '.join(k for k in known if k != '_target_')})")


def validate_override_keys(overrides: list[str]) -> None:
    """A command line's `trainer.epoch=3` (a key its schema lacks) as the one line `+trainer.epoch=3` gets, before
    Hydra composes: Hydra's own error would suggest adding the key with `+`. The settings groups (trainer, device,
    logger), whose schema is the same for every option, and the blocks of `model.blocks=[...]` (model=cnn_blocks'
    alone); Hydra refuses the other groups' unknown keys itself."""
    for arg in overrides:
        key = arg.split("=", 1)[0]
        group, _, path = key.partition(".")
        if key == "model.blocks":
            validate_block_keys(arg)
        if "=" not in arg or arg.startswith(("-", "+", "~")) or "@" in key or not path or group not in SETTINGS:
            continue
        schema, where = GROUPS[group][SETTINGS[group]], group
        for name in path.split("."):
            types = typing.get_type_hints(schema)
            if name not in types:
                raise unknown_key(where, name, [f.name for f in dataclasses.fields(schema)])
            schema, where = types[name], f"{where}.{name}"
            if not dataclasses.is_dataclass(schema):
                break


def validate_block_keys(override: str) -> None:
    """`model.blocks=[{chanels: 8}]`: each block's keys against ConvBlockConfig's (a sweep over lists is left to
    the check of each composed config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(override)
    blocks = [] if parsed.is_sweep_override() else parsed.value()
    known = [f.name for f in dataclasses.fields(ConvBlockConfig)]
    for i, block in enumerate(blocks if isinstance(blocks, list) else []):
        unknown = [k for k in (block if isinstance(block, dict) else {}) if k not in known]
        if unknown:
            raise unknown_key(f"model.blocks[{i}]", str(unknown[0]), known)


def validate_trainer(t: DictConfig) -> None:
    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every", "log_every"):
        _require(t[key] > 0, f"trainer.{key}", "must be a positive integer", t[key])
    for key in ("checkpoint_every", "limit_train_batches", "limit_eval_batches", "overfit_batches", "grad_clip",
                "warmup_epochs"):
        _require(t[key] >= 0, f"trainer.{key}", "must be >= 0 (0 = off)", t[key])
    _require(t.accumulate >= 1, "trainer.accumulate", "must be >= 1", t.accumulate)
    _require(t.lr_find_steps >= 20, "trainer.lr_find_steps", "must be >= 20 (the suggestion needs a curve)",
             t.lr_find_steps)
    _require(0 < t.lr_find_min_lr < t.lr_find_max_lr, "trainer.lr_find_min_lr",
             f"must be > 0 and below trainer.lr_find_max_lr={t.lr_find_max_lr}", t.lr_find_min_lr)
    _require(not (t.lr_find and t.devices > 1), "trainer.lr_find", "runs in one process: find the lr with "
             "trainer.devices=1, then train with optimizer.lr=<the suggestion> and trainer.devices=N", t.lr_find)
    _require(t.model_summary_depth >= 1, "trainer.model_summary_depth",
             "must be >= 1 (levels of nested modules; trainer.model_summary=false turns the summary off)",
             t.model_summary_depth)
    _require(0 <= t.seed <= SEED_MAX, "trainer.seed", f"must be in 0 .. {SEED_MAX} (what numpy's seed accepts)",
             t.seed)
    _require(t.devices >= 1, "trainer.devices", "must be >= 1 (processes training one model together)", t.devices)
    if t.devices > 1:
        check_data_parallel(t, t.devices)
    _require(0 <= t.label_smoothing < 1, "trainer.label_smoothing", "must be in [0, 1)", t.label_smoothing)
    _require(0 <= t.ema_decay < 1, "trainer.ema_decay", "must be in [0, 1) (0 = off)", t.ema_decay)
    _require(t.freeze_epochs >= 0, "trainer.freeze_epochs", "must be >= 0 (0 = off)", t.freeze_epochs)
    _require(not (t.freeze_epochs and t.devices > 1), "trainer.freeze_epochs",
             "changes which weights train mid-run, which DDP cannot follow: use trainer.devices=1", t.freeze_epochs)
    # beyond trainer.epochs it averages nothing (summary: swa.averaged_epochs 0), so a preset's swa_start
    # survives a shorter run (debug=fast_dev_run, trainer.epochs=5)
    _require(t.swa_start >= 0, "trainer.swa_start", "must be >= 0 (the first epoch averaged; 0 = off)", t.swa_start)
    for key in ("mixup", "cutmix"):
        _require(t[key] >= 0, f"trainer.{key}", "must be >= 0 (the Beta distribution's alpha; 0 = off)", t[key])
    _require(t.save_top_k >= 1, "trainer.save_top_k", "must be >= 1 (1 = best.pt only)", t.save_top_k)
    _require(t.save_top_k == 1 or t.save_checkpoints, "trainer.save_top_k",
             "keeps checkpoints: it needs trainer.save_checkpoints=true", t.save_top_k)
    _require(t.early_stopping.patience >= 0, "trainer.early_stopping.patience", "must be >= 0 (0 = off)",
             t.early_stopping.patience)
    _require(t.early_stopping.min_delta >= 0, "trainer.early_stopping.min_delta", "must be >= 0",
             t.early_stopping.min_delta)
    splits = ("train", "val", "val_ema") if t.ema_decay > 0 else ("train", "val")
    split, _, metric = t.monitor.partition("/")
    _require(
        t.monitor == "auto" or (split in splits and metric in ("loss", "acc", "mae")),
        "trainer.monitor",
        f"allowed: auto, or one of {', '.join(splits)} / loss, acc (classification), mae (regression)",
        t.monitor,
    )


def validate_distill(d: DictConfig, dataset: DictConfig) -> None:
    """trainer.distill: T > 0 and alpha in [0, 1] (with or without a teacher: a value out of range is an error
    even where it does nothing yet); a teacher run folder with a best checkpoint, a classification dataset,
    the one the teacher's saved config names. (The data itself, classes and shapes, is compared once it is
    loaded: dlrun.run.load_teacher.)"""
    _require(d.temperature > 0, "trainer.distill.temperature", "must be > 0", d.temperature)
    _require(0 <= d.alpha <= 1, "trainer.distill.alpha", "must be in [0, 1] (0 = plain training)", d.alpha)
    if d.teacher is None:
        return
    key, folder = "trainer.distill.teacher", RunDir(Path(d.teacher).expanduser())
    _require(folder.best.is_file(), key, "must be a finished dlrun run folder (with checkpoints/best.pt)", d.teacher)
    ours = dataset.get("_target_")
    _require(ours != SEQUENCE, key, "distillation needs a classification dataset (dataset=sequence is regression)",
             d.teacher)
    saved = read_yaml(folder.hydra_config) if folder.hydra_config.is_file() else {}
    theirs = ((saved.get("dataset") or {}) if isinstance(saved, dict) else {}).get("_target_")
    _require(theirs in (None, ours), key, f"the teacher was trained on other data ({theirs}; the student's: {ours})",
             d.teacher)


TIMM = "dlrun.models.TimmModel"


def check_timm_name(name: str) -> None:
    """An architecture timm knows (with or without a pretrained tag, `resnet18.a1_in1k`); otherwise one line with
    the closest names."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.name={name!r} is not an architecture timm knows{hint} (all: timm.list_models())")


def validate_timm(model: DictConfig, resumed: bool) -> None:
    """model=timm: timm installed, an architecture it knows (close names otherwise), a weights file that exists
    (unless `resumed`)."""
    require_extra("timm", ("timm",), "model=timm")
    check_timm_name(model.name)
    _require(0 <= model.drop_rate < 1, "model.drop_rate", "must be in [0, 1)", model.drop_rate)
    if isinstance(model.pretrained, str) and not resumed:
        _require(Path(model.pretrained).expanduser().is_file(), "model.pretrained",
                 "must be false, true (timm's own weights) or a weights file that exists", model.pretrained)


def validate_model(model: DictConfig, resumed: bool = False) -> None:
    if model.get("_target_") == TIMM:
        validate_timm(model, resumed)
    if "dropout" in model:
        _require(0 <= model.dropout < 1, "model.dropout", "must be in [0, 1)", model.dropout)
    for key in ("hidden_size", "num_layers", "kernel_size"):
        if key in model:
            _require(model[key] > 0, f"model.{key}", "must be a positive integer", model[key])
    if "channels" in model:
        _require(
            len(model.channels) > 0 and all(c > 0 for c in model.channels),
            "model.channels",
            "must be a non-empty list of positive integers",
            list(model.channels),
        )
    if OmegaConf.is_list(model.get("hidden")):
        _require(all(h > 0 for h in model.hidden), "model.hidden", "must be positive integers", list(model.hidden))
    elif "head" in model:  # the CNN's head: one width or a list of widths
        _require(type(model.hidden) is int and model.hidden >= 0, "model.hidden",
                 "must be a width >= 0 (0 = no hidden layer) or a list of positive widths", model.hidden)
    if model.get("head_dropout") is not None:
        _require(0 <= model.head_dropout < 1, "model.head_dropout", "must be in [0, 1), or null", model.head_dropout)
    if model.get("blocks") is not None:
        validate_blocks(model)
    if model.get("_target_") in ("dlrun.models.ResNet", "dlrun.models.Transformer"):
        validate_residual_model(model)
    if model.get("_target_") == "dlrun.models.RNN" and "patch_size" in model:
        _require(model.patch_size > 0, "model.patch_size", "must be a positive integer (1 = one step at a time)",
                 model.patch_size)


def validate_blocks(model: DictConfig) -> None:
    """model=cnn_blocks: a non-empty list of blocks, each with channels and sizes in range."""
    _require(OmegaConf.is_list(model.blocks) and len(model.blocks) > 0, "model.blocks",
             "must be a non-empty list of blocks such as {channels: 32, kernel: 3}", model.blocks)
    for i, block in enumerate(model.blocks):
        where = f"model.blocks[{i}]"
        if not OmegaConf.is_dict(block) or "channels" not in block or OmegaConf.is_missing(block, "channels"):
            raise ConfigError(f"{where} names no channels: every block is a mapping such as {{channels: 32, kernel: 3}}")
        for key in ("channels", "kernel", "stride", "pool_size"):
            if key in block:  # a composed config has them all; a config written by hand may leave some out
                _require(block[key] > 0, f"{where}.{key}", "must be a positive integer", block[key])
        if "dropout" in block:
            _require(0 <= block.dropout < 1, f"{where}.dropout", "must be in [0, 1)", block.dropout)


def validate_residual_model(model: DictConfig) -> None:
    """model=resnet: depth 6n + 2; model=transformer: positive sizes, heads dividing d_model, a list of stem widths."""
    for key in ("depth", "width", "d_model", "heads", "layers", "ff_dim"):
        if key in model:
            _require(model[key] > 0, f"model.{key}", "must be a positive integer", model[key])
    if "depth" in model:
        _require(model.depth >= 8 and (model.depth - 2) % 6 == 0, "model.depth",
                 "must be 6n + 2 for n >= 1 (8, 14, 20, 32, 44, 56, 110)", model.depth)
    if "heads" in model:
        _require(model.d_model % model.heads == 0, "model.d_model", f"must be a multiple of model.heads={model.heads}",
                 model.d_model)
    if "patch_size" in model:
        _require(model.patch_size >= 0, "model.patch_size", "must be >= 0 (0 = a token per step or per row)",
                 model.patch_size)
    if "stem" in model:
        _require(all(w > 0 for w in model.stem), "model.stem",
                 "must be a list of positive widths ([] = no convolutions before the tokens)", list(model.stem))
    if "stem_kernel" in model:
        _require(model.stem_kernel > 0, "model.stem_kernel", "must be a positive integer", model.stem_kernel)


# The generated datasets' sizes and the data options that count something: at least 1.
DATASET_COUNTS = ("num_samples", "num_series", "length", "horizon", "num_sines", "in_memory_limit")


def validate_dataset(ds: DictConfig) -> None:
    for key in ("val_fraction", "test_fraction", "train_split"):
        if key in ds:
            _require(0 < ds[key] < 1, f"dataset.{key}", "must be in (0, 1)", ds[key])
    for key in DATASET_COUNTS:
        if key in ds:
            _require(ds[key] >= 1, f"dataset.{key}", "must be a positive integer", ds[key])
    for key in ("noise", "workers"):
        if key in ds:
            _require(ds[key] >= 0, f"dataset.{key}", "must be >= 0", ds[key])
    for key in ("seed", "split_seed", "generator_seed"):
        if key in ds:
            _require(0 <= ds[key] <= SEED_MAX, f"dataset.{key}", f"must be in 0 .. {SEED_MAX}", ds[key])
    if "val_fraction" in ds and "test_fraction" in ds:
        total = ds.val_fraction + ds.test_fraction
        if total >= 1:
            raise ConfigError(f"dataset.val_fraction + dataset.test_fraction = {total:g} is invalid: must be < 1 "
                              f"(val_fraction={ds.val_fraction}, test_fraction={ds.test_fraction})")
    for key in ("data_dir", "cache_dir"):
        if key in ds:  # a read-only one is fine while it holds what the run reads (see dlrun.data._cached)
            problem = dir_problem(ds[key], write=False)
            _require(problem is None, f"dataset.{key}", f"cannot be used as a data directory: {problem}", ds[key])
    if "root" in ds:
        _require(Path(ds.root).expanduser().is_dir(), "dataset.root", "no such directory", ds.root)
    if "augment" in ds:
        _require(ds.augment in ("none", "randaugment"), "dataset.augment", "allowed: none, randaugment", ds.augment)
    if ds.get("folds", 0):
        _require(ds.folds >= 2, "dataset.folds", "must be >= 2 (k-fold cross-validation), or 0 for none", ds.folds)
        _require(0 <= ds.fold < ds.folds, "dataset.fold", f"must be in [0, {ds.folds}) with dataset.folds={ds.folds}",
                 ds.fold)
    elif ds.get("fold", 0):
        _require(False, "dataset.fold", "is used with dataset.folds=K (k-fold cross-validation; 0 = off)", ds.fold)
    if "crop_padding" in ds:
        _require(ds.crop_padding >= 0, "dataset.crop_padding", "must be >= 0 (0 = off)", ds.crop_padding)
        validate_shift(ds)
    if "augment_noise" in ds:
        _require(ds.augment_noise >= 0, "dataset.augment_noise", "must be >= 0 (0 = off)", ds.augment_noise)
    if "channels" in ds:
        _require(ds.channels in (1, 3), "dataset.channels", "allowed: 1 (grayscale), 3 (RGB)", ds.channels)
    if "image_size" in ds:
        _require(len(ds.image_size) == 2 and min(ds.image_size) > 0, "dataset.image_size",
                 "must be [height, width], both positive", list(ds.image_size))


# The files torchvision reads for each of its datasets, relative to the data dir (as its classes name them).
DATASET_FILES = {
    "mnist": [f"MNIST/raw/{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")],
    "fashion_mnist": [f"FashionMNIST/raw/{s}-{k}-ubyte" for s in ("train", "t10k")
                      for k in ("images-idx3", "labels-idx1")],
    "cifar10": [f"cifar-10-batches-py/{f}" for f in
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")],
    "cifar100": [f"cifar-100-python/{f}" for f in ("train", "test", "meta")],
}


def dataset_files(name: str, data_dir: str) -> list[Path]:
    """The files torchvision reads for dataset `name` under `data_dir`."""
    root = Path(data_dir).expanduser().resolve()
    return [root / f for f in DATASET_FILES[name]]


def missing_files(name: str, root: Path, missing: list[Path]) -> str:
    """The one line for dataset files that are not there, and the two ways to get them."""
    hint = ""
    if name.startswith(("mnist", "fashion")):
        hint = " (the .gz files from the official site also work with dataset.download=true, offline)"
    named = ", ".join(f"{p} (a folder, not the file)" if p.is_dir() else str(p) for p in missing)
    return (f"dataset={name}: cannot load the files under {root} (missing: {named}); "
            f"set dataset.download=true to download them when online{hint}")


def validate_files(ds: DictConfig) -> None:
    """A torchvision dataset's files are there (or will be downloaded): checked before the run folder exists."""
    name = str(ds.get("_target_", "")).removeprefix("dlrun.data.load_")
    if name in DATASET_FILES and not ds.download:
        missing = [p for p in dataset_files(name, ds.data_dir) if not p.is_file()]
        if missing:
            raise ConfigError(missing_files(name, Path(ds.data_dir).expanduser().resolve(), missing))


def validate_device(device: DictConfig) -> None:
    """device=cuda needs a CUDA device (torch is imported for this check only when asked for cuda; the run
    imports it a moment later anyway)."""
    if device.type != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for, but torch finds no CUDA device (torch "
                          f"{torch.__version__}, built with CUDA {torch.version.cuda}); use device=cpu or device=auto")


def forecast_shift_problem(crop_padding: int) -> str | None:
    """Why shifting the input windows of a forecast (dataset=sequence) is refused; None when it is off."""
    if not crop_padding:
        return None
    return (f"dataset.crop_padding={crop_padding} is invalid for dataset=sequence: a shifted input window "
            "predicts a different future than its target; must be 0 (dataset.augment_noise is allowed)")


def validate_shift(ds: DictConfig) -> None:
    """1-D shifts: none for forecasts (sequence), fewer steps than a signal has for MNIST-1D."""
    if ds.get("_target_") == SEQUENCE:
        problem = forecast_shift_problem(ds.crop_padding)
        if problem:
            raise ConfigError(problem)
    if ds.get("_target_") == "dlrun.data.load_mnist1d":
        _require(ds.crop_padding < MNIST1D_LENGTH, "dataset.crop_padding",
                 f"must be < {MNIST1D_LENGTH}, the length of the MNIST-1D signals", ds.crop_padding)


def dir_problem(path: str | Path, write: bool = True) -> str | None:
    """Why `path` cannot be used as a directory that is created if missing and, with `write`, written;
    None if it can. Nothing is created: the nearest existing folder is checked instead.

    Beyond permissions (`os.access`, which root always passes), the filesystem is asked: a read-only
    mount is refused, and one that reports no storage at all (procfs, sysfs; also an unlimited tmpfs
    or some FUSE mounts) is tried by making and removing a uniquely named probe folder with a file
    in it, the one case where nothing cheaper tells."""
    path = Path(path).expanduser().resolve()
    existing = path
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as err:  # e.g. a parent that cannot be searched
        return f"{existing} cannot be checked ({err.strerror or err})"
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not write:
        return None
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    try:
        fs = os.statvfs(existing)
    except OSError as err:
        return f"{existing} cannot be checked ({err.strerror or err})"
    if fs.f_flag & os.ST_RDONLY:
        return f"{existing} is on a read-only filesystem"
    if fs.f_blocks == 0:
        return _probe_problem(existing)
    return None


def _probe_problem(folder: Path) -> str | None:
    """Why `folder` cannot hold a new folder with a file in it, found by making (and removing) one."""
    probe = folder / f".dlrun-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as err:
        return f"{folder} cannot hold a new folder ({err.strerror or err}) on its filesystem, which reports no storage"
    try:
        os.close(os.open(probe / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe / "file")
    except OSError as err:
        return f"{folder} cannot hold files ({err.strerror or err}) on its filesystem, which reports no storage"
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass
    return None
