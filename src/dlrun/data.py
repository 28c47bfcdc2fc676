"""Datasets and the in-memory batch loader.

A dataset builder (named by `dataset._target_`) returns `RawSplits`: numpy
arrays for train/val/test that fit in memory. `build_data` turns them into
normalised tensors on the training device plus a `DataSpec` that models read
their shapes from. Batches are cut by index; the order of an epoch is a pure
function of (seed, epoch), so a run can be replayed batch for batch.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its input and output."""

    input_shape: tuple[int, ...]  # one sample, channels first: (C, L) signal or (C, H, W) image
    num_outputs: int  # classes for classification
    task: str = "classification"
    name: str = ""


@dataclass
class RawSplits:
    """Decoded data as numpy arrays, before normalisation: x is (N, C, ...) and y is (N,)."""

    name: str
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    num_classes: int


@dataclass
class Data:
    """Normalised tensors on the training device, plus their spec and statistics."""

    spec: DataSpec
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    mean: list[float] = field(default_factory=list)  # per channel, of the training split
    std: list[float] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {name: len(y) for name, (_, y) in self.splits.items()}


# ------------------------------------------------------------------ builders


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Stratified split: (rest, held_out) with `fraction` of each class held out."""
    from sklearn.model_selection import train_test_split

    x_rest, x_out, y_rest, y_out = train_test_split(x, y, test_size=fraction, random_state=seed, stratify=y)
    return (x_rest, y_rest), (x_out, y_out)


def load_digits(test_fraction: float, val_fraction: float, split_seed: int) -> RawSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = bunch.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    rest, test = _split(x, y, test_fraction, split_seed)
    train, val = _split(*rest, val_fraction / (1.0 - test_fraction), split_seed)
    return RawSplits("digits", train, val, test, num_classes=10)


def load_mnist1d(
    data_dir: str,
    num_samples: int,
    train_split: float,
    val_fraction: float,
    split_seed: int,
    generator_seed: int,
) -> RawSplits:
    """MNIST-1D (Greydanus 2020), generated offline by the `mnist1d` package and cached as .npz."""
    params = {"num_samples": num_samples, "train_split": train_split, "seed": generator_seed}
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    cache = Path(data_dir).expanduser().resolve() / "mnist1d" / f"mnist1d-{key}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        arrays = _generate_mnist1d(params)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(cache)
    x = arrays["x"].astype(np.float32)[:, None]  # (N, 1, 40)
    y = arrays["y"].astype(np.int64)
    train, val = _split(x, y, val_fraction, split_seed)
    test = (arrays["x_test"].astype(np.float32)[:, None], arrays["y_test"].astype(np.int64))
    return RawSplits("mnist1d", train, val, test, num_classes=10)


def _generate_mnist1d(params: dict) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for k, v in params.items():
        setattr(args, k, v)
    # make_dataset reseeds numpy's and Python's global RNGs; leave them as they were.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}


# ------------------------------------------------------------------ pipeline


def build_data(raw: RawSplits, device: torch.device) -> Data:
    """Normalise with the training split's per-channel statistics and move to `device`."""
    x_train = raw.train[0]
    reduce_axes = (0,) + tuple(range(2, x_train.ndim))  # all but the channel axis
    mean = x_train.mean(axis=reduce_axes, keepdims=True)
    std = x_train.std(axis=reduce_axes, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    splits = {}
    for name in ("train", "val", "test"):
        x, y = getattr(raw, name)
        xt = torch.from_numpy(((x - mean) / std).astype(np.float32)).to(device)
        splits[name] = (xt, torch.from_numpy(y).to(device))
    spec = DataSpec(input_shape=tuple(x_train.shape[1:]), num_outputs=raw.num_classes, name=raw.name)
    return Data(spec, splits, mean=mean.ravel().tolist(), std=std.ravel().tolist())


def quick_check_subsets(data: Data, overfit_samples: int = 0, eval_samples: int = 0) -> Data:
    """For quick checks: train (and validate) on the first `overfit_samples` training samples;
    evaluate on the first `eval_samples` of val and test. Zero leaves a split whole."""
    splits = dict(data.splits)
    if overfit_samples:
        x, y = splits["train"]
        splits["train"] = splits["val"] = (x[:overfit_samples], y[:overfit_samples])
    if eval_samples:
        for name in ("val", "test"):
            x, y = splits[name]
            splits[name] = (x[:eval_samples], y[:eval_samples])
    return replace(data, splits=splits)


def channels_last(data: Data) -> Data:
    """Images (N, C, H, W) in NHWC memory order; other inputs unchanged. Batches cut by index keep it."""
    splits = {
        name: (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, y)
        for name, (x, y) in data.splits.items()
    }
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
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
    return -(-n // batch_size)
