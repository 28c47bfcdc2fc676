"""Config schema: one dataclass per config-group option, registered in Hydra's ConfigStore.

Every default is declared here once. The YAML files under ``conf/`` only pick a
schema (``defaults: [/schema/<group>/<option>@_here_]``), so a typo or a wrong type in a YAML file
or on the command line fails at composition with Hydra's message naming the key.
``dlrun.config.validate`` adds the cross-field and range rules that types cannot express.

This module must stay light: the CLI imports it for ``--help``, ``--cfg`` and
shell completion, which must never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

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
class CNNConfig:
    _target_: str = "dlrun.models.CNN"
    channels: List[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3
    pool: Pool = Pool.max
    batch_norm: bool = True
    dropout: float = 0.1  # after each block of `channels`, channel-wise; and after the head's hidden layers
    # the head's hidden layers: a width (0 = none) or a list of widths; checked in validate.py
    hidden: Any = 128
    # a list of ConvBlockConfig used instead of channels, kernel_size and pool (null: use those)
    blocks: Optional[List[ConvBlockConfig]] = None
    head: CNNHead = CNNHead.flatten  # flatten, or avg (global average pool) before the hidden layers
    head_dropout: Optional[float] = None  # after every hidden layer and before the output; null: `dropout` as above


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


@dataclass
class ResNetConfig:
    _target_: str = "dlrun.models.ResNet"
    depth: int = 20  # 6n + 2: 8, 14, 20, 32, 44, 56, 110
    width: int = 16  # channels of the first stage; the second and third have 2x and 4x


@dataclass
class TransformerConfig:
    _target_: str = "dlrun.models.Transformer"
    d_model: int = 64
    heads: int = 4  # must divide d_model
    layers: int = 2
    ff_dim: int = 128  # width of each layer's feed-forward block
    dropout: float = 0.1
    positional: Positional = Positional.learned
    readout: TokenReadout = TokenReadout.mean
    patch_size: int = 0  # 0: a token per step (C, L) or per row (C, H, W); p: p steps or p x p pixels


# ----------------------------------------------------------------- optimizer
# Built as `instantiate(cfg.optimizer, _partial_=True)(model.parameters())`.


# `fused`: null (the default) takes torch's fused kernel where it has one for the parameters' device
# (CPU and CUDA: faster optimizer steps, part of bench/loop_overhead.py's fast paths); true or false forces it.


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    lr: float = 0.05
    weight_decay: float = 0.0
    fused: Optional[bool] = None


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
    fused: Optional[bool] = None


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
    # training-time augmentation, batched on the device (0 = off)
    crop_padding: int = 0  # random shifts by up to this many steps either way, zero-padded (as image crops)
    augment_noise: float = 0.0  # std of Gaussian noise added to the (normalised) training inputs


MNIST1D_LENGTH = 40  # the generator's final_seq_length: the length of every MNIST-1D signal


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
    augment_noise: float = 0.0  # std of Gaussian noise added to the (normalised) training inputs; 0 = off
    crop_padding: int = 0  # must stay 0: a shifted window would predict another future than its target


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
    threads: int = 0  # intra-op CPU threads; 0: torch's default, at most the CPUs this process may use (cpus.py)


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
class DistillConfig:
    """Knowledge distillation from a trained run (Hinton et al. 2015): the training loss becomes
    alpha * T^2 * KL(teacher's soft targets || student's) + (1 - alpha) * cross-entropy on the labels."""

    teacher: Optional[str] = None  # a finished run folder of the same dataset; null = off
    temperature: float = 4.0  # T: softens both distributions (> 0)
    alpha: float = 0.5  # weight of the soft targets, in [0, 1]; 0 = plain training


@dataclass
class TrainerConfig:
    epochs: int = 15
    batch_size: int = 64
    # 128: on a CPU, a CNN evaluates about twice as fast as in batches of 512 (its activations stay in
    # the cache); an MLP is indifferent to it and an LSTM a few percent slower
    eval_batch_size: int = 128
    seed: int = 0
    eval_every: int = 1  # validate every N epochs (and always after the last)
    log_every: int = 10  # steps between progress-display refreshes (each one reads the loss)
    # selects the best checkpoint and is what a sweep optimises; auto: val/acc, or val/loss for regression
    monitor: str = "auto"
    monitor_mode: MonitorMode = MonitorMode.auto
    save_checkpoints: bool = True
    checkpoint_every: int = 0  # also write the last checkpoint every N steps; 0 = at epoch ends only
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
    distill: DistillConfig = field(default_factory=DistillConfig)
    warmup_epochs: float = 0.0  # linear lr warmup, on top of any scheduler
    # NHWC memory format for 2-D models and images; null: on where it is faster (device.use_channels_last)
    channels_last: Optional[bool] = None
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
    "model": {"cnn": CNNConfig, "rnn": RNNConfig, "mlp": MLPConfig, "resnet": ResNetConfig,
              "transformer": TransformerConfig},
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
    """`cfg.trainer` as the schema object, checked against the schema: keys added since a config
    was saved take their defaults, unknown keys and wrong types are refused."""
    if isinstance(node, TrainerConfig):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerConfig), node))


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (strings for enums): safe for JSON and weights_only checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
