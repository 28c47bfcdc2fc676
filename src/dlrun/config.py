"""Config schema: one dataclass per config-group option, registered in Hydra's ConfigStore.

Every default is declared here once. The YAML files under ``conf/`` only pick a
schema (``defaults: [/schema/<group>/<option>@_here_]``), so a typo or a wrong type in a YAML file
or on the command line fails at composition with Hydra's message naming the key.
``validate`` adds the cross-field and range rules that types cannot express.

This module must stay light: the CLI imports it for ``--help``, ``--cfg`` and
shell completion, which must never import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class DlrunError(Exception):
    """A failure the user can act on: the CLI reports it as one clear line, never as a traceback."""


class ConfigError(DlrunError, ValueError):
    """Bad user input (a value, a path, a pairing that cannot work)."""


# Enums subclass str so that models and summaries see plain strings.
class Pool(str, Enum):
    max = "max"
    avg = "avg"
    none = "none"


class Cell(str, Enum):
    rnn = "rnn"
    lstm = "lstm"
    gru = "gru"


class Readout(str, Enum):
    last = "last"  # the last time step's output
    mean = "mean"  # the mean over time steps
    flatten = "flatten"  # every time step's output, concatenated (a fixed sequence length)


class DeviceType(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OnNonFinite(str, Enum):
    stop = "stop"  # stop the run, keep the last good checkpoint, status failed
    skip = "skip"  # skip the batch (costs one host-device sync per step)


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16 (CPU and CUDA)
    fp16 = "fp16"  # autocast to float16 with a GradScaler


class ClipMode(str, Enum):
    norm = "norm"  # clip the global L2 norm of all gradients
    value = "value"  # clamp every gradient element


class MonitorMode(str, Enum):
    auto = "auto"  # max for accuracy-like metrics, min for losses
    max = "max"
    min = "min"


# --------------------------------------------------------------------- model
# Model classes are built as `_target_(in_shape=..., num_outputs=..., **fields)`:
# the data supplies the shapes, the config the hyper-parameters.


@dataclass
class CNNConfig:
    _target_: str = "dlrun.models.CNN"
    channels: List[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3
    pool: Pool = Pool.max
    batch_norm: bool = True
    dropout: float = 0.1
    hidden: int = 128  # width of the fully connected layer before the head; 0 = none


@dataclass
class MLPConfig:
    _target_: str = "dlrun.models.MLP"
    hidden: List[int] = field(default_factory=lambda: [256, 128])  # [] = logistic regression
    batch_norm: bool = True
    dropout: float = 0.1


@dataclass
class RNNConfig:
    _target_: str = "dlrun.models.RNN"
    cell: Cell = Cell.lstm
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0  # between stacked layers and before the head
    readout: Readout = Readout.last  # what of the output sequence feeds the head


# ----------------------------------------------------------------- optimizer
# Built as `instantiate(cfg.optimizer, _partial_=True)(model.parameters())`.


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    lr: float = 0.05
    weight_decay: float = 0.0


@dataclass
class MomentumConfig(SGDConfig):
    momentum: float = 0.9
    nesterov: bool = True
    dampening: float = 0.0


@dataclass
class RMSpropConfig:
    _target_: str = "torch.optim.RMSprop"
    lr: float = 1e-3
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = 0.01


# ----------------------------------------------------------------- scheduler
# Built as `instantiate(cfg.scheduler, _partial_=True)(optimizer, steps_per_epoch=,
# total_steps=, mode=)`; every builder lives in dlrun.optim and says how it is stepped.


@dataclass
class NoSchedulerConfig:
    _target_: str = "dlrun.optim.no_scheduler"


@dataclass
class StepSchedulerConfig:
    _target_: str = "dlrun.optim.step_lr"
    step_epochs: int = 5  # multiply the lr by gamma every step_epochs epochs
    gamma: float = 0.1


@dataclass
class CosineSchedulerConfig:
    _target_: str = "dlrun.optim.cosine_lr"
    min_lr_ratio: float = 0.0  # the lr at the end, as a fraction of the initial lr


@dataclass
class OneCycleSchedulerConfig:
    _target_: str = "dlrun.optim.onecycle_lr"
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4


@dataclass
class PlateauSchedulerConfig:
    _target_: str = "dlrun.optim.plateau_lr"
    factor: float = 0.1
    patience: int = 3  # evaluations without improvement of the monitored metric
    threshold: float = 1e-4
    min_lr: float = 0.0


# ------------------------------------------------------------------- dataset
# Built as `instantiate(cfg.dataset)`: returns the raw splits (see dlrun.data).

DATA_DIR = "${oc.env:DLRUN_DATA_DIR,data}"  # relative to where dlrun runs; git-ignored in the project


@dataclass
class DigitsConfig:
    _target_: str = "dlrun.data.load_digits"
    test_fraction: float = 0.2
    val_fraction: float = 0.1  # of the whole set, taken from what is left after the test split
    split_seed: int = 0
    crop_padding: int = 0  # random crops with this padding (0 = off)
    hflip: bool = False  # random horizontal flips


@dataclass
class Mnist1DConfig:
    _target_: str = "dlrun.data.load_mnist1d"
    data_dir: str = DATA_DIR  # the generated set is cached here
    num_samples: int = 5000
    train_split: float = 0.8  # 4000 train / 1000 test, as in the benchmark
    val_fraction: float = 0.1  # of the training split
    split_seed: int = 0
    generator_seed: int = 42  # the benchmark's own seed


@dataclass
class SequenceConfig:
    _target_: str = "dlrun.data.load_sequence"
    num_series: int = 4000
    length: int = 50  # input steps
    horizon: int = 5  # values to predict
    num_sines: int = 2  # each series is a sum of this many random sines
    noise: float = 0.05  # std of the Gaussian noise on every value
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0


@dataclass
class MNISTConfig:
    _target_: str = "dlrun.data.load_mnist"
    data_dir: str = DATA_DIR  # files in <data_dir>/MNIST/raw/
    download: bool = False
    val_fraction: float = 5000 / 60000  # 55k / 5k / 10k
    split_seed: int = 0
    crop_padding: int = 0  # random crops with this padding (0 = off)
    hflip: bool = False  # random horizontal flips (no use for digits; fine for Fashion-MNIST)


@dataclass
class FashionMNISTConfig(MNISTConfig):
    _target_: str = "dlrun.data.load_fashion_mnist"  # files in <data_dir>/FashionMNIST/raw/


@dataclass
class CIFAR10Config:
    _target_: str = "dlrun.data.load_cifar10"
    data_dir: str = DATA_DIR  # files in <data_dir>/cifar-10-batches-py/
    download: bool = False
    val_fraction: float = 0.1
    split_seed: int = 0
    verify: bool = True  # check torchvision's md5 sums of the files
    crop_padding: int = 4  # random crops with this padding (0 = off)
    hflip: bool = True  # random horizontal flips


@dataclass
class CIFAR100Config(CIFAR10Config):
    _target_: str = "dlrun.data.load_cifar100"  # files in <data_dir>/cifar-100-python/


@dataclass
class ImageFolderConfig:
    _target_: str = "dlrun.data.load_imagefolder"
    root: str = MISSING  # <root>/<class>/*.png, or <root>/{train,val[,test]}/<class>/*.png
    image_size: List[int] = field(default_factory=lambda: [32, 32])  # H, W after resizing
    channels: int = 3  # 3 = RGB, 1 = grayscale
    val_fraction: float = 0.1  # used when root has no train/val folders
    test_fraction: float = 0.1
    split_seed: int = 0
    in_memory_limit: int = 50000  # more images than this are streamed through a DataLoader
    workers: int = 2  # DataLoader workers when streaming
    cache_dir: str = DATA_DIR  # decoded images are cached here
    crop_padding: int = 0
    hflip: bool = False


# -------------------------------------------------------------------- logger


@dataclass
class LoggerConfig:
    tensorboard: bool = True  # event files in <run>/tensorboard
    mlflow: bool = False
    # a local SQLite-backed store by default (artifacts beside it); any MLflow tracking URI works
    mlflow_tracking_uri: str = "sqlite:///outputs/mlflow.db"
    mlflow_experiment: str = "dlrun"


@dataclass
class MLflowLoggerConfig(LoggerConfig):
    mlflow: bool = True


# -------------------------------------------------------------------- device


@dataclass
class DeviceConfig:
    type: DeviceType = DeviceType.auto  # auto: CUDA when present, else CPU
    threads: int = 0  # intra-op CPU threads; 0 keeps torch's default


@dataclass
class CPUDeviceConfig(DeviceConfig):
    type: DeviceType = DeviceType.cpu


@dataclass
class CUDADeviceConfig(DeviceConfig):
    type: DeviceType = DeviceType.cuda


# ------------------------------------------------------------------- trainer


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # evaluations without an improvement of trainer.monitor before stopping; 0 = off
    min_delta: float = 0.0  # the smallest change that counts as an improvement


@dataclass
class TrainerConfig:
    epochs: int = 15
    batch_size: int = 64
    eval_batch_size: int = 512
    seed: int = 0
    eval_every: int = 1  # validate every N epochs (and always after the last)
    log_every: int = 10  # steps between progress-display refreshes (each one reads the loss)
    # selects checkpoints/best.pt and is what a sweep optimises; auto: val/acc, or val/loss for regression
    monitor: str = "auto"
    monitor_mode: MonitorMode = MonitorMode.auto
    save_checkpoints: bool = True
    checkpoint_every: int = 0  # also write checkpoints/last.pt every N steps; 0 = at epoch ends only
    on_nonfinite: OnNonFinite = OnNonFinite.stop  # what a NaN/inf training loss does
    # loop features
    precision: Precision = Precision.fp32
    grad_clip: float = 0.0  # 0 = off
    grad_clip_mode: ClipMode = ClipMode.norm
    accumulate: int = 1  # micro-batches of batch_size per optimizer step
    label_smoothing: float = 0.0  # training loss only; val/test losses are plain cross-entropy
    decay_norm_and_bias: bool = True  # false: no weight decay on biases and normalisation weights
    ema_decay: float = 0.0  # > 0 keeps an exponential moving average of the weights (e.g. 0.999)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    warmup_epochs: float = 0.0  # linear lr warmup, on top of any scheduler
    channels_last: bool = False  # NHWC memory format for 2-D models and images
    compile: bool = False  # torch.compile the model (pays off on GPUs, rarely on small CPU runs)
    deterministic: bool = False  # torch.use_deterministic_algorithms for the run
    # data-parallel processes (DDP, one per CPU share or GPU), one run folder; torchrun sets its own
    devices: int = 1
    # quick checks (see conf/debug/)
    limit_train_batches: int = 0  # batches per epoch; 0 = all
    limit_eval_batches: int = 0  # val and test batches (of eval_batch_size); 0 = all
    overfit_batches: int = 0  # train, and validate, on the same first N batches; 0 = off


# -------------------------------------------------------------------- config

GROUPS = {
    "model": {"cnn": CNNConfig, "rnn": RNNConfig, "mlp": MLPConfig},
    "optimizer": {
        "sgd": SGDConfig,
        "momentum": MomentumConfig,
        "rmsprop": RMSpropConfig,
        "adam": AdamConfig,
        "adamw": AdamWConfig,
    },
    "scheduler": {
        "none": NoSchedulerConfig,
        "step": StepSchedulerConfig,
        "cosine": CosineSchedulerConfig,
        "onecycle": OneCycleSchedulerConfig,
        "plateau": PlateauSchedulerConfig,
    },
    "dataset": {
        "digits": DigitsConfig,
        "mnist1d": Mnist1DConfig,
        "sequence": SequenceConfig,
        "mnist": MNISTConfig,
        "fashion_mnist": FashionMNISTConfig,
        "cifar10": CIFAR10Config,
        "cifar100": CIFAR100Config,
        "imagefolder": ImageFolderConfig,
    },
    "device": {"auto": DeviceConfig, "cpu": CPUDeviceConfig, "cuda": CUDADeviceConfig},
    "trainer": {"default": TrainerConfig},
    "logger": {"default": LoggerConfig, "mlflow": MLflowLoggerConfig},
}


@dataclass
class Config:
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    dataset: Any = None
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # A run folder to continue, with its saved config: `dlrun resume=outputs/2026-11-28/14-03-07`.
    resume: Optional[str] = None


def cpu_share(n_jobs: int) -> int:
    cores = os.cpu_count() or 1
    jobs = cores if n_jobs < 1 else min(n_jobs, cores)
    return max(1, cores // jobs)


# What a config's `_target_` may name (Hydra 1.4 asks every instantiate call for an execution
# whitelist): dlrun's and PyTorch's callables. A model's own target is allowed by name, since
# `model=custom model._target_=my_pkg.MyNet` exists to run the user's code.
TRUSTED_TARGETS = ("dlrun.*", "torch.*")


def instantiate_trusted(cfg: Any, *also: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` limited to TRUSTED_TARGETS and the targets in `also`."""
    from hydra.utils import instantiate

    return instantiate(cfg, _execution_whitelist_=[*TRUSTED_TARGETS, *also], **kwargs)


def register_configs(cs: ConfigStore | None = None) -> None:
    """Store each schema as `schema/<group>/<option>` and the top level as `schema/config`.

    A YAML option picks its schema with `defaults: [/schema/<group>/<option>@_here_]`;
    keeping the schemas in their own group keeps them out of the user's option lists.
    """
    # `${dlrun.if_resume:${resume},A,B}` is A when resuming, else B (conf/config.yaml uses it
    # to point Hydra's run folder at the resumed one).
    OmegaConf.register_resolver("dlrun.if_resume", lambda resume, then, other: then if resume else other, replace=True)
    # `${dlrun.cpu_share:N}`: CPU threads per job when N jobs share the machine (N = -1: one per core).
    OmegaConf.register_resolver("dlrun.cpu_share", cpu_share, replace=True)
    cs = cs or ConfigStore.instance()
    cs.store(group="schema", name="config", node=Config, replace=True)
    for group, options in GROUPS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node, replace=True)


# ---------------------------------------------------------------- validation

def resolve_monitor(trainer: DictConfig | TrainerConfig, task: str) -> tuple[str, str]:
    """The monitored metric (`auto`: val/acc, or val/loss for regression) and `max` or `min`
    (`monitor_mode: auto` decides by the name: accuracy is maximised, losses and errors minimised)."""
    monitor = trainer.monitor
    if monitor == "auto":
        monitor = "val/loss" if task == "regression" else "val/acc"
    metric = monitor.rsplit("/", 1)[-1]
    reported = ("loss", "mae") if task == "regression" else ("loss", "acc")
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


def validate(cfg: DictConfig) -> None:
    """Range and cross-field rules, checked before any tensor exists."""
    t = cfg.trainer
    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every", "log_every"):
        _require(t[key] > 0, f"trainer.{key}", "must be a positive integer", t[key])
    for key in ("checkpoint_every", "limit_train_batches", "limit_eval_batches", "overfit_batches", "grad_clip",
                "warmup_epochs"):
        _require(t[key] >= 0, f"trainer.{key}", "must be >= 0 (0 = off)", t[key])
    _require(t.accumulate >= 1, "trainer.accumulate", "must be >= 1", t.accumulate)
    _require(t.devices >= 1, "trainer.devices", "must be >= 1 (processes training one model together)", t.devices)
    if t.devices > 1:
        check_data_parallel(t, t.devices)
    _require(0 <= t.label_smoothing < 1, "trainer.label_smoothing", "must be in [0, 1)", t.label_smoothing)
    _require(0 <= t.ema_decay < 1, "trainer.ema_decay", "must be in [0, 1) (0 = off)", t.ema_decay)
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

    opt = cfg.optimizer
    _require(opt.get("lr", 1.0) > 0, "optimizer.lr", "must be > 0", opt.get("lr"))
    _require(opt.get("weight_decay", 0.0) >= 0, "optimizer.weight_decay", "must be >= 0", opt.get("weight_decay"))

    model = cfg.model
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

    ds = cfg.dataset
    for key in ("val_fraction", "test_fraction"):
        if key in ds:
            _require(0 < ds[key] < 1, f"dataset.{key}", "must be in (0, 1)", ds[key])
    if "val_fraction" in ds and "test_fraction" in ds:
        total = ds.val_fraction + ds.test_fraction
        _require(total < 1, "dataset.val_fraction", "val_fraction + test_fraction must be < 1", total)
    for key in ("data_dir", "cache_dir"):
        if key in ds:
            problem = dir_problem(ds[key])
            _require(problem is None, f"dataset.{key}", f"cannot be used as a data directory: {problem}", ds[key])
    if "root" in ds:
        _require(Path(ds.root).expanduser().is_dir(), "dataset.root", "no such directory", ds.root)
    if "crop_padding" in ds:
        _require(ds.crop_padding >= 0, "dataset.crop_padding", "must be >= 0 (0 = off)", ds.crop_padding)
    if "channels" in ds:
        _require(ds.channels in (1, 3), "dataset.channels", "allowed: 1 (grayscale), 3 (RGB)", ds.channels)
    if "image_size" in ds:
        _require(len(ds.image_size) == 2 and min(ds.image_size) > 0, "dataset.image_size",
                 "must be [height, width], both positive", list(ds.image_size))

    _require(cfg.device.threads >= 0, "device.threads", "must be >= 0 (0 keeps torch's default)", cfg.device.threads)


def dir_problem(path: str | Path) -> str | None:
    """Why `path` cannot be (created and) written as a directory, or None if it can."""
    path = Path(path).expanduser().resolve()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def resume_checkpoint(folder: str) -> Path:
    """The checkpoint that `resume=<folder>` continues from; a clear error if there is none."""
    run_dir = Path(folder).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"resume={folder}: no such run folder")
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        raise ConfigError(f"resume={folder}: {last} does not exist (was trainer.save_checkpoints=false?)")
    return last


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (strings for enums): safe for JSON and weights_only checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
