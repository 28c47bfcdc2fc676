"""The data on the training device: `build_data` normalises a dataset's raw splits with the training
split's per-channel statistics and holds them as `Split`s, with the `DataSpec` (shapes, task) a run
builds its model from:

- `TensorSplit`: normalised tensors held on the device, batches cut by index;
- `StreamSplit`: image files decoded by DataLoader workers, normalised on the device.

Both order an epoch by a permutation that is a pure function of (seed, epoch) (`epoch_generator`),
so a run can be replayed batch for batch and resumed mid-epoch exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from dlrun.data.augment import Augment, Augment1D, build_augment
from dlrun.data.datasets import ImageFiles, RawSplits, check_sizes, decoded, k_fold
from dlrun.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its input and output."""

    input_shape: tuple[int, ...]  # one sample, channels first: (C, L) signal or (C, H, W) image
    num_outputs: int  # classes for classification, predicted values for regression
    task: str = "classification"  # or "regression"
    name: str = ""


class Split(Protocol):
    def __len__(self) -> int: ...
    def batches(self, batch_size: int, generator: torch.Generator | None = None, start: int = 0) -> Iterator[Batch]: ...
    def take(self, n: int) -> "Split": ...


class TensorSplit:
    """A split held in memory as tensors on the training device; batches are cut by index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, start: int = 0) -> Iterator[Batch]:
        return batches(self.x, self.y, batch_size, generator, start)

    def take(self, n: int) -> TensorSplit:
        return TensorSplit(self.x[:n], self.y[:n])


class StreamSplit:
    """Image files decoded per batch by DataLoader workers, then normalised on the device."""

    def __init__(self, images: ImageFiles, mean: torch.Tensor, std: torch.Tensor, device: torch.device, workers: int):
        self.images, self.mean, self.std, self.device, self.workers = images, mean, std, device, workers

    def __len__(self) -> int:
        return len(self.images.labels)

    def batches(self, batch_size: int, generator: torch.Generator | None = None, start: int = 0) -> Iterator[Batch]:
        from torch.utils.data import DataLoader

        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        loader = DataLoader(
            _DecodedImages(self.images),
            batch_size=batch_size,
            sampler=order[start * batch_size :].tolist(),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        try:
            for x, y in loader:
                x = x.to(self.device, non_blocking=True).float()
                yield (x - self.mean) / self.std, y.to(self.device, non_blocking=True)
        except ConfigError as err:  # from a worker, torch puts the worker's traceback in front of our one line
            raise ConfigError(str(err).strip().splitlines()[-1].removeprefix(f"{ConfigError.__module__}.ConfigError: "))

    def take(self, n: int) -> StreamSplit:
        subset = replace(self.images, files=self.images.files[:n], labels=self.images.labels[:n])
        return StreamSplit(subset, self.mean, self.std, self.device, self.workers)


class _DecodedImages(torch.utils.data.Dataset):
    def __init__(self, images: ImageFiles) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = decoded(self.images.files[i], self.images.size, self.images.channels)
        return torch.from_numpy(image), self.images.labels[i]


@dataclass
class Data:
    """The splits on the training device, their spec, normalisation and augmentation."""

    spec: DataSpec
    splits: dict[str, Split]
    mean: list[float] = field(default_factory=list)  # per channel, of the training split
    std: list[float] = field(default_factory=list)
    augment: Augment | Augment1D | None = None  # applied to training batches only
    classes: list[str] | None = None  # class names, where the data has them

    def describe(self) -> dict:
        """What a checkpoint needs to turn raw inputs into predictions (see dlrun.predict)."""
        return {"name": self.spec.name, "task": self.spec.task, "input_shape": list(self.spec.input_shape),
                "num_outputs": self.spec.num_outputs, "mean": self.mean, "std": self.std, "classes": self.classes}

    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}


def build_data(raw: RawSplits, device: torch.device) -> Data:
    """Normalise with the training split's per-channel statistics and put the splits on `device`."""
    check_splits(raw)
    train = raw.train
    if isinstance(train, ImageFiles):  # statistics of up to 2,000 of the files
        sample = np.stack([decoded(f, train.size, train.channels) for f in train.files[:2000]])
        mean, std = _channel_stats(torch.from_numpy(sample).float())
        input_shape: tuple[int, ...] = (train.channels, *train.size)
    else:
        mean, std = _channel_stats(torch.from_numpy(train[0]).to(device).float())
        input_shape = tuple(train[0].shape[1:])
    mean, std = mean.to(device), std.to(device)
    splits: dict[str, Split] = {}
    for name in ("train", "val", "test"):
        part = getattr(raw, name)
        if isinstance(part, ImageFiles):
            splits[name] = StreamSplit(part, mean, std, device, raw.workers)
        else:
            # a copy: normalising in place would change the loader's arrays (twice, where two splits share one)
            x = torch.from_numpy(part[0]).to(device, torch.float32, copy=True).sub_(mean).div_(std)
            splits[name] = TensorSplit(x, torch.from_numpy(part[1]).to(device))
    spec = DataSpec(input_shape=input_shape, num_outputs=raw.num_outputs, task=raw.task, name=raw.name)
    top = 255.0 if isinstance(train, ImageFiles) else float(np.max(train[0]))  # the raw scale, for RandAugment
    augment = build_augment(input_shape, raw.name, raw.crop_padding, raw.hflip, raw.augment_noise, raw.randaugment,
                            (mean.flatten().tolist(), std.flatten().tolist(), top))
    return Data(spec, splits, mean=mean.flatten().tolist(), std=std.flatten().tolist(), augment=augment,
                classes=raw.classes)


def check_splits(raw: RawSplits) -> None:
    """Data a run can use: no split empty, and a classifier's labels within its classes."""
    labels = {name: part.labels if isinstance(part, ImageFiles) else part[1]
              for name, part in (("train", raw.train), ("val", raw.val), ("test", raw.test))}
    check_sizes(raw.name, {name: len(y) for name, y in labels.items()})
    for name, y in labels.items():
        if raw.task == "classification" and (int(np.min(y)) < 0 or int(np.max(y)) >= raw.num_outputs):
            raise ConfigError(f"dataset {raw.name}: the {name} split has labels {int(np.min(y))}..{int(np.max(y))}, "
                              f"outside the {raw.num_outputs} classes 0..{raw.num_outputs - 1}; its label files "
                              "do not belong to these images")


def build_dataset(cfg: Any, device: torch.device) -> Data:
    """The configured dataset on `device`: `cfg._target_` (one of the loaders above, or the user's own,
    which a config read back from a checkpoint may name only with the user's consent: see
    config/targets.py) called with the config's keys."""
    from omegaconf import open_dict

    from dlrun.config.targets import instantiate_trusted

    loader = cfg.copy()
    with open_dict(loader):  # k-fold and RandAugment apply to any loader's splits (older saved configs lack the keys)
        folds, fold, augment = loader.pop("folds", 0), loader.pop("fold", 0), loader.pop("augment", "none")
    raw = replace(instantiate_trusted(loader, cfg._target_), randaugment=augment == "randaugment")
    return build_data(k_fold(raw, folds, fold, cfg.get("split_seed", cfg.get("seed", 0))) if folds else raw, device)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of (N, C, ...) inputs, shaped to broadcast over them."""
    dims = [0, *range(2, x.dim())]
    std, mean = torch.std_mean(x, dim=dims, correction=0, keepdim=True)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def quick_check_subsets(data: Data, overfit_samples: int = 0, eval_samples: int = 0) -> Data:
    """For quick checks: train (and validate) on the first `overfit_samples` training samples;
    evaluate on the first `eval_samples` of val and test. Zero leaves a split whole."""
    splits = dict(data.splits)
    if overfit_samples:
        splits["train"] = splits["val"] = splits["train"].take(overfit_samples)
    if eval_samples:
        for name in ("val", "test"):
            splits[name] = splits[name].take(eval_samples)
    return replace(data, splits=splits)


def channels_last(data: Data) -> Data:
    """In-memory images (N, C, H, W) in NHWC memory order; other splits unchanged. Batches cut by index keep it."""
    splits: dict[str, Split] = {}
    for name, split in data.splits.items():
        if isinstance(split, TensorSplit) and split.x.dim() == 4:
            split = TensorSplit(split.x.contiguous(memory_format=torch.channels_last), split.y)
        splits[name] = split
    return replace(data, splits=splits)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG that orders one epoch: a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)



def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    start: int = 0,
) -> Iterator[Batch]:
    """Cut (x, y) into batches by index, from batch number `start` on.

    Shuffled when a generator is given (the whole order is drawn first, so skipping
    `start` batches gives exactly the rest of the epoch), in order otherwise.
    """
    n = len(y)
    if generator is None:
        for first in range(start * batch_size, n, batch_size):
            yield x[first : first + batch_size], y[first : first + batch_size]
        return
    order = torch.randperm(n, generator=generator).to(x.device)
    for first in range(start * batch_size, n, batch_size):
        idx = order[first : first + batch_size]
        yield x[idx], y[idx]


def num_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
