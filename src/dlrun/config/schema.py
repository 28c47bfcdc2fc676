"""Config schema: one dataclass per config-group option, registered in Hydra's ConfigStore.

The schemas declare the keys and their types; the values (every default) are declared once, in the
YAML files under ``conf/``, each of which extends its schema (``defaults: [/schema/<group>/<option>@_here_]``),
so a typo or a wrong type in a YAML file or on the command line fails at composition with Hydra's
message naming the key. Only what YAML cannot hold is here: each option's ``_target_`` (what it builds)
and the defaults of a `model.blocks` entry (`ConvBlockConfig`), filled into every entry a user writes.
``dlrun.config.validate`` adds the cross-field and range rules that types cannot express.

This module must stay light: the CLI imports it for ``--help``, ``--cfg`` and
shell completion, which must never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


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


class Padding(str, Enum):
    same = "same"  # kernel // 2 on each side: the size is kept (divided by the stride)
    valid = "valid"  # none: a kernel k takes k - 1 off the size


class CNNHead(str, Enum):
    flatten = "flatten"  # every feature of the last block
    avg = "avg"  # global average pool: one feature per channel


class TokenReadout(str, Enum):
    mean = "mean"  # the mean over tokens
    cls = "cls"  # a learned [CLS] token prepended to the sequence


class Positional(str, Enum):
    learned = "learned"
    sinusoidal = "sinusoidal"


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


def score_name(task: str) -> str:
    """The metric reported next to the loss: accuracy, or mean absolute error for regression."""
    return "mae" if task == "regression" else "acc"


class MonitorMode(str, Enum):
    auto = "auto"  # max for accuracy-like metrics, min for losses
    max = "max"
    min = "min"


# --------------------------------------------------------------------- model
# Model classes are built as `_target_(in_shape=..., num_outputs=..., **fields)`:
# the data supplies the shapes, the config the hyper-parameters.


@dataclass
class ConvBlockConfig:
    """One entry of `model.blocks`: conv -> (batch norm) -> ReLU -> (pool) -> (dropout)."""

    channels: int = MISSING
    kernel: int = 3
    stride: int = 1
    padding: Padding = Padding.same
    pool: Pool = Pool.none
    pool_size: int = 2  # window and stride
    dropout: float = 0.0  # element-wise (Keras' Dropout, torch's nn.Dropout)


@dataclass
class CNNHeadConfig:
    """What both CNN options share: normalisation, dropout and the head (see dlrun.models.CNN)."""

    _target_: str = "dlrun.models.CNN"
    batch_norm: bool = MISSING
    dropout: float = MISSING
    hidden: Any = MISSING  # a width (0 = none) or a list of widths; checked in validate.py
    head: CNNHead = MISSING
    head_dropout: Optional[float] = MISSING


@dataclass
class CNNConfig(CNNHeadConfig):
    """model=cnn: the `channels` shorthand (a "same" convolution per width, a pool and channel dropout each)."""

    channels: List[int] = MISSING
    kernel_size: int = MISSING
    pool: Pool = MISSING


@dataclass
class CNNBlocksConfig(CNNHeadConfig):
    """model=cnn_blocks: the layers written out, one `ConvBlockConfig` per block (no `channels`, `kernel_size`
    or `pool` here: each block names its own)."""

    blocks: List[ConvBlockConfig] = MISSING


@dataclass
class MLPConfig:
    _target_: str = "dlrun.models.MLP"
    hidden: List[int] = MISSING
    batch_norm: bool = MISSING
    dropout: float = MISSING


@dataclass
class RNNConfig:
    _target_: str = "dlrun.models.RNN"
    cell: Cell = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    bidirectional: bool = MISSING
    dropout: float = MISSING
    readout: Readout = MISSING
    patch_size: int = 1  # steps read at once (a default: see models/rnn.py)


@dataclass
class ResNetConfig:
    _target_: str = "dlrun.models.ResNet"
    depth: int = MISSING
    width: int = MISSING


@dataclass
class TransformerConfig:
    _target_: str = "dlrun.models.Transformer"
    d_model: int = MISSING
    heads: int = MISSING
    layers: int = MISSING
    ff_dim: int = MISSING
    dropout: float = MISSING
    positional: Positional = MISSING
    readout: TokenReadout = MISSING
    patch_size: int = MISSING
    stem: List[int] = field(default_factory=list)  # widths of the convolutions before the tokens (none: [])
    stem_kernel: int = 5


@dataclass
class TimmConfig:
    _target_: str = "dlrun.models.TimmModel"
    name: str = MISSING
    pretrained: Union[bool, str] = MISSING  # false, true (timm's own weights) or a weights file
    drop_rate: float = MISSING


# ----------------------------------------------------------------- optimizer
# Built as `instantiate(cfg.optimizer, _partial_=True)(model.parameters())`. `fused`: null takes torch's
# fused kernel where it has one for the parameters' device; true or false forces it (see dlrun.optim).


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    lr: float = MISSING
    weight_decay: float = MISSING
    fused: Optional[bool] = MISSING


@dataclass
class MomentumConfig(SGDConfig):
    momentum: float = MISSING
    nesterov: bool = MISSING
    dampening: float = MISSING


@dataclass
class RMSpropConfig:
    _target_: str = "torch.optim.RMSprop"
    lr: float = MISSING
    alpha: float = MISSING
    eps: float = MISSING
    momentum: float = MISSING
    centered: bool = MISSING
    weight_decay: float = MISSING


@dataclass
class AdadeltaConfig:
    _target_: str = "torch.optim.Adadelta"
    lr: float = MISSING
    rho: float = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    lr: float = MISSING
    betas: List[float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING
    amsgrad: bool = MISSING
    fused: Optional[bool] = MISSING


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = MISSING


# ----------------------------------------------------------------- scheduler
# Built as `instantiate(cfg.scheduler, _partial_=True)(optimizer, steps_per_epoch=,
# total_steps=, mode=)`; every builder lives in dlrun.optim and says how it is stepped.


@dataclass
class NoSchedulerConfig:
    _target_: str = "dlrun.optim.no_scheduler"


@dataclass
class StepSchedulerConfig:
    _target_: str = "dlrun.optim.step_lr"
    step_epochs: int = MISSING
    gamma: float = MISSING


@dataclass
class CosineSchedulerConfig:
    _target_: str = "dlrun.optim.cosine_lr"
    min_lr_ratio: float = MISSING


@dataclass
class OneCycleSchedulerConfig:
    _target_: str = "dlrun.optim.onecycle_lr"
    pct_start: float = MISSING
    div_factor: float = MISSING
    final_div_factor: float = MISSING


@dataclass
class PlateauSchedulerConfig:
    _target_: str = "dlrun.optim.plateau_lr"
    factor: float = MISSING
    patience: int = MISSING
    threshold: float = MISSING
    min_lr: float = MISSING


# ------------------------------------------------------------------- dataset
# Built as `instantiate(cfg.dataset)`: returns the raw splits (see dlrun.data).


@dataclass
class DigitsConfig:
    _target_: str = "dlrun.data.load_digits"
    test_fraction: float = MISSING
    val_fraction: float = MISSING
    split_seed: int = MISSING
    crop_padding: int = MISSING
    hflip: bool = MISSING
    augment: str = MISSING  # none | randaugment
    folds: int = MISSING  # k-fold cross-validation (dlrun.data.k_fold)
    fold: int = MISSING


@dataclass
class Mnist1DConfig:
    _target_: str = "dlrun.data.load_mnist1d"
    data_dir: str = MISSING
    num_samples: int = MISSING
    train_split: float = MISSING
    val_fraction: float = MISSING
    split_seed: int = MISSING
    generator_seed: int = MISSING
    crop_padding: int = MISSING
    augment_noise: float = MISSING
    folds: int = MISSING  # k-fold cross-validation (dlrun.data.k_fold)
    fold: int = MISSING


MNIST1D_LENGTH = 40  # the generator's final_seq_length: the length of every MNIST-1D signal


@dataclass
class SequenceConfig:
    _target_: str = "dlrun.data.load_sequence"
    num_series: int = MISSING
    length: int = MISSING
    horizon: int = MISSING
    num_sines: int = MISSING
    noise: float = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    seed: int = MISSING
    augment_noise: float = MISSING
    crop_padding: int = MISSING
    folds: int = MISSING  # k-fold cross-validation (dlrun.data.k_fold)
    fold: int = MISSING


@dataclass
class MNISTConfig:
    _target_: str = "dlrun.data.load_mnist"
    data_dir: str = MISSING
    download: bool = MISSING
    val_fraction: float = MISSING
    split_seed: int = MISSING
    crop_padding: int = MISSING
    hflip: bool = MISSING
    augment: str = MISSING  # none | randaugment
    folds: int = MISSING  # k-fold cross-validation (dlrun.data.k_fold)
    fold: int = MISSING


@dataclass
class FashionMNISTConfig(MNISTConfig):
    _target_: str = "dlrun.data.load_fashion_mnist"  # files in <data_dir>/FashionMNIST/raw/


@dataclass
class CIFAR10Config:
    _target_: str = "dlrun.data.load_cifar10"
    data_dir: str = MISSING
    download: bool = MISSING
    val_fraction: float = MISSING
    split_seed: int = MISSING
    verify: bool = MISSING
    crop_padding: int = MISSING
    hflip: bool = MISSING
    augment: str = MISSING  # none | randaugment
    folds: int = MISSING  # k-fold cross-validation (dlrun.data.k_fold)
    fold: int = MISSING


@dataclass
class CIFAR100Config(CIFAR10Config):
    _target_: str = "dlrun.data.load_cifar100"  # files in <data_dir>/cifar-100-python/


@dataclass
class ImageFolderConfig:
    _target_: str = "dlrun.data.load_imagefolder"
    root: str = MISSING
    image_size: List[int] = MISSING
    channels: int = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    split_seed: int = MISSING
    in_memory_limit: int = MISSING
    workers: int = MISSING
    cache_dir: str = MISSING
    crop_padding: int = MISSING
    hflip: bool = MISSING
    augment: str = MISSING  # none | randaugment
    folds: int = MISSING  # k-fold cross-validation (dlrun.data.k_fold)
    fold: int = MISSING


# -------------------------------------------------------------------- logger


@dataclass
class LoggerConfig:
    tensorboard: bool = MISSING
    histograms: bool = MISSING
    plots: bool = MISSING
    mlflow: bool = MISSING
    mlflow_tracking_uri: str = MISSING
    mlflow_experiment: str = MISSING
    wandb: bool = MISSING
    wandb_project: str = MISSING
    wandb_mode: str = MISSING


# -------------------------------------------------------------------- device


@dataclass
class DeviceConfig:
    type: DeviceType = MISSING
    threads: int = MISSING


# ------------------------------------------------------------------- trainer


@dataclass
class EarlyStoppingConfig:
    patience: int = MISSING
    min_delta: float = MISSING


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained run (Hinton et al. 2015): the training loss becomes
    alpha * T^2 * KL(teacher's soft targets || student's) + (1 - alpha) * cross-entropy on the labels."""

    teacher: Optional[str] = MISSING
    temperature: float = MISSING
    alpha: float = MISSING


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    seed: int = MISSING
    eval_every: int = MISSING
    log_every: int = MISSING
    monitor: str = MISSING
    monitor_mode: MonitorMode = MISSING
    save_checkpoints: bool = MISSING
    checkpoint_every: int = MISSING
    on_nonfinite: OnNonFinite = MISSING
    precision: Precision = MISSING
    grad_clip: float = MISSING
    grad_clip_mode: ClipMode = MISSING
    accumulate: int = MISSING
    label_smoothing: float = MISSING
    decay_norm_and_bias: bool = MISSING
    ema_decay: float = MISSING
    freeze_epochs: int = MISSING
    swa_start: int = MISSING
    mixup: float = MISSING
    cutmix: float = MISSING
    save_top_k: int = MISSING
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    warmup_epochs: float = MISSING
    channels_last: Optional[bool] = MISSING
    compile: bool = MISSING
    deterministic: bool = MISSING
    devices: int = MISSING
    limit_train_batches: int = MISSING
    limit_eval_batches: int = MISSING
    overfit_batches: int = MISSING
    model_summary: bool = MISSING
    model_summary_depth: int = MISSING
    lr_find: bool = MISSING
    lr_find_steps: int = MISSING
    lr_find_min_lr: float = MISSING
    lr_find_max_lr: float = MISSING
    lr_find_apply: bool = MISSING


# -------------------------------------------------------------------- config

GROUPS = {
    "model": {"cnn": CNNConfig, "cnn_blocks": CNNBlocksConfig, "rnn": RNNConfig, "mlp": MLPConfig,
              "resnet": ResNetConfig, "transformer": TransformerConfig, "timm": TimmConfig},
    "optimizer": {
        "sgd": SGDConfig,
        "momentum": MomentumConfig,
        "rmsprop": RMSpropConfig,
        "adadelta": AdadeltaConfig,
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
    "device": {"auto": DeviceConfig},  # cpu and cuda extend auto (conf/device/)
    "trainer": {"default": TrainerConfig},
    "logger": {"default": LoggerConfig},  # mlflow extends default (conf/logger/)
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
    resume: Optional[str] = MISSING  # a run folder to continue (conf/config.yaml)


def cpu_share(n_jobs: int) -> int:
    """Threads per job when `n_jobs` jobs share the CPUs this process may use (-1: one job per CPU)."""
    from dlrun.cpus import usable_cpus

    cores = usable_cpus()
    jobs = cores if n_jobs < 1 else min(n_jobs, cores)
    return max(1, cores // jobs)


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


def trainer_config(node: DictConfig | dict | TrainerConfig) -> TrainerConfig:
    """`cfg.trainer` as the schema object, checked against the schema (unknown keys, wrong types and
    missing values are refused)."""
    if isinstance(node, TrainerConfig):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerConfig), node))


def conf_dir() -> Path:
    """The `conf/` directory: inside the installed package, or at the top of a checkout."""
    here = Path(__file__).resolve().parents[1]  # the dlrun package
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dlrun's config directory was not found next to {here}")


# The sections of a saved config that are settings of dlrun itself, and the option whose values fill
# the keys added since the config was saved.
SETTINGS = {"trainer": "default", "device": "auto", "logger": "default"}


def with_current_keys(cfg: DictConfig) -> DictConfig:
    """A config saved by an earlier dlrun (a checkpoint's) with the trainer, device and logger keys added since
    at today's values (conf/<group>/<option>.yaml), checked against today's schema (unknown keys and wrong types
    are refused). The built groups (model, optimizer, ...) stay as saved, so that a resumed run goes on exactly
    as it began."""
    for group, option in SETTINGS.items():
        values = OmegaConf.load(conf_dir() / group / f"{option}.yaml")
        values.pop("defaults", None)
        schema = OmegaConf.structured(GROUPS[group][option])
        cfg[group] = OmegaConf.merge(schema, values, cfg.get(group) or {})
    return cfg


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (strings for enums): safe for JSON and weights_only checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
