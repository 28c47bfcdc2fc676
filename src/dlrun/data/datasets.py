"""Dataset builders: each one (named by `dataset._target_`) returns `RawSplits`, the decoded data
before normalisation: for each of train/val/test either numpy arrays that fit in memory or an
`ImageFiles` list to stream. Generated and decoded data is cached as .npz under the data dir.

Torch-free at import: torchvision and scikit-learn's data file are reached only by the builder
that needs them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import zipfile
import zlib
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from dlrun.config.validate import dataset_files, dir_problem, forecast_shift_problem, missing_files
from dlrun.errors import ConfigError, DlrunError
from dlrun.rundir import atomic_write

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageFiles:
    """Image paths and labels, decoded batch by batch (for folders too large to hold in memory)."""

    files: list[str]
    labels: list[int]
    size: tuple[int, int]  # (H, W) after resizing
    channels: int  # 1 (grayscale) or 3 (RGB)


ArraySplit = tuple[np.ndarray, np.ndarray]


@dataclass
class RawSplits:
    """Decoded data before normalisation: x is (N, C, ...) and y is (N,) labels or (N, K) targets."""

    name: str
    train: Union[ArraySplit, ImageFiles]
    val: Union[ArraySplit, ImageFiles]
    test: Union[ArraySplit, ImageFiles]
    num_outputs: int  # classes, or values per target
    task: str = "classification"
    crop_padding: int = 0  # batched augmentation of training inputs, on the device (crops, or shifts of signals)
    hflip: bool = False
    augment_noise: float = 0.0  # Gaussian noise on 1-D training inputs (in normalised units)
    workers: int = 0  # DataLoader workers for streamed splits
    randaugment: bool = False  # dataset.augment=randaugment (set by build_dataset for any loader)
    classes: list[str] | None = None  # class names, where the data has them



# ------------------------------------------------------------------ helpers


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, stratify: bool = True):
    """(rest, held_out) with `fraction` of the samples held out, drawn per class for classification
    (so each class keeps its share), in the original order within each part."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(len(y))]
    held = np.zeros(len(y), dtype=bool)
    for members in groups:
        held[rng.permutation(members)[: round(fraction * len(members))]] = True
    return (x[~held], y[~held]), (x[held], y[held])


def fold_of(y: np.ndarray, folds: int, seed: int, stratify: bool) -> np.ndarray:
    """Each sample's fold (0..folds-1): per class (for classification) the samples in an order drawn from `seed`,
    dealt to the folds in turn, so every fold gets each class's share and the folds are disjoint and cover all."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for members in ([np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(len(y))]):
        fold[rng.permutation(members)] = (offset + np.arange(len(members))) % folds
        offset += len(members)  # the next class starts where this one stopped: fold sizes differ by one at most
    return fold


def k_fold(raw: RawSplits, folds: int, fold: int, seed: int) -> RawSplits:
    """`dataset.folds=K dataset.fold=k`: the training and validation data pooled (train first, then val, each in
    its loader's order), cut into K folds by `fold_of`; fold k validates, the others train. The test split
    stays as it is."""
    if isinstance(raw.train, ImageFiles):
        files, labels = raw.train.files + raw.val.files, np.asarray(raw.train.labels + raw.val.labels)
        which = fold_of(labels, folds, seed, raw.task == "classification")
        part = lambda keep: replace(raw.train, files=[f for f, k in zip(files, keep) if k],  # noqa: E731
                                    labels=labels[keep].tolist())
    else:
        x, y = np.concatenate([raw.train[0], raw.val[0]]), np.concatenate([raw.train[1], raw.val[1]])
        which = fold_of(y, folds, seed, raw.task == "classification")
        part = lambda keep: (x[keep], y[keep])  # noqa: E731
    return replace(raw, train=part(which != fold), val=part(which == fold))


def _cached(path: Path, make: Callable[[], dict[str, np.ndarray]], key: str, value: str) -> dict[str, np.ndarray]:
    """Arrays from the .npz at `path`, made (and written atomically) on the first call. What is cached is
    made offline, so a file that cannot be read is made again (with a warning), not an error. Only
    then must the folder be writable: a read-only data dir (`key`=`value`) that holds the file is fine."""
    if path.is_file():
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as err:
            log.warning("the cache %s cannot be read (%s: %s); making it again", path, type(err).__name__, err)
    problem = dir_problem(path.parent)
    if problem is not None:  # found before making what could not be kept
        raise ConfigError(f"{key}={value} cannot hold {path.relative_to(Path(value).expanduser().resolve())}, "
                          f"which this run must write: {problem}")
    arrays = make()
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return arrays


def _key(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------ builders


def load_digits(test_fraction: float, val_fraction: float, split_seed: int, crop_padding: int = 0,
                hflip: bool = False) -> RawSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package), read from the
    package's own file as sklearn.datasets.load_digits reads it, without importing scikit-learn (a
    few seconds: more than training the default model)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DlrunError("dataset=digits needs scikit-learn, which ships the data: pip install scikit-learn")
    table = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    x = table[:, :-1].reshape(-1, 1, 8, 8).astype(np.float32)  # (N, 1, 8, 8), values 0..16
    y = table[:, -1].astype(np.int64)
    rest, test = _split(x, y, test_fraction, split_seed)
    train, val = _split(*rest, val_fraction / (1.0 - test_fraction), split_seed)
    return RawSplits("digits", train, val, test, num_outputs=10, crop_padding=crop_padding, hflip=hflip,
                     classes=[str(d) for d in range(10)])


def load_mnist1d(
    data_dir: str,
    num_samples: int,
    train_split: float,
    val_fraction: float,
    split_seed: int,
    generator_seed: int,
    crop_padding: int = 0,
    augment_noise: float = 0.0,
) -> RawSplits:
    """MNIST-1D (Greydanus 2020), generated offline by the `mnist1d` package and cached as .npz."""
    params = {"num_samples": num_samples, "train_split": train_split, "seed": generator_seed}
    cache = Path(data_dir).expanduser().resolve() / "mnist1d" / f"mnist1d-{_key(params)}.npz"
    arrays = _cached(cache, lambda: _generate_mnist1d(params), "dataset.data_dir", data_dir)
    x = arrays["x"].astype(np.float32)[:, None]  # (N, 1, 40)
    y = arrays["y"].astype(np.int64)
    train, val = _split(x, y, val_fraction, split_seed)
    test = (arrays["x_test"].astype(np.float32)[:, None], arrays["y_test"].astype(np.int64))
    return RawSplits("mnist1d", train, val, test, num_outputs=10, crop_padding=crop_padding,
                     augment_noise=augment_noise)


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


def load_sequence(
    num_series: int, length: int, horizon: int, num_sines: int, noise: float,
    val_fraction: float, test_fraction: float, seed: int, crop_padding: int = 0, augment_noise: float = 0.0,
) -> RawSplits:
    """Regression: from `length` values of a noisy sum of sines, predict the next `horizon` values.
    Training inputs may get noise (`augment_noise`), never shifts (see `forecast_shift_problem`)."""
    problem = forecast_shift_problem(crop_padding)
    if problem:
        raise ConfigError(problem)
    rng = np.random.default_rng(seed)
    t = np.arange(length + horizon)
    freq = rng.uniform(0.01, 0.1, (num_series, num_sines, 1))  # cycles per step
    amp = rng.uniform(0.3, 1.0, (num_series, num_sines, 1))
    phase = rng.uniform(0, 2 * np.pi, (num_series, num_sines, 1))
    series = (amp * np.sin(2 * np.pi * freq * t + phase)).sum(axis=1)  # (N, length + horizon)
    series += noise * rng.standard_normal(series.shape)
    x = series[:, None, :length].astype(np.float32)  # (N, 1, length): one feature per step
    y = series[:, length:].astype(np.float32)  # (N, horizon)
    rest, test = _split(x, y, test_fraction, seed, stratify=False)
    train, val = _split(*rest, val_fraction / (1.0 - test_fraction), seed, stratify=False)
    return RawSplits("sequence", train, val, test, num_outputs=horizon, task="regression",
                     augment_noise=augment_noise)


def load_mnist(data_dir: str, download: bool, val_fraction: float, split_seed: int, crop_padding: int = 0,
               hflip: bool = False) -> RawSplits:
    """MNIST through torchvision: <data_dir>/MNIST/raw/*-ubyte (IDX files)."""
    return _torchvision_splits("mnist", data_dir, download, val_fraction, split_seed, True, crop_padding, hflip)


def load_fashion_mnist(data_dir: str, download: bool, val_fraction: float, split_seed: int, crop_padding: int = 0,
                       hflip: bool = False) -> RawSplits:
    """Fashion-MNIST through torchvision: <data_dir>/FashionMNIST/raw/*-ubyte (IDX files)."""
    return _torchvision_splits("fashion_mnist", data_dir, download, val_fraction, split_seed, True, crop_padding,
                               hflip)


def load_cifar10(data_dir: str, download: bool, val_fraction: float, split_seed: int, verify: bool,
                 crop_padding: int, hflip: bool) -> RawSplits:
    """CIFAR-10 through torchvision: <data_dir>/cifar-10-batches-py/ (python pickles)."""
    return _torchvision_splits("cifar10", data_dir, download, val_fraction, split_seed, verify, crop_padding, hflip)


def load_cifar100(data_dir: str, download: bool, val_fraction: float, split_seed: int, verify: bool,
                  crop_padding: int, hflip: bool) -> RawSplits:
    """CIFAR-100 (fine labels) through torchvision: <data_dir>/cifar-100-python/ (python pickles)."""
    return _torchvision_splits("cifar100", data_dir, download, val_fraction, split_seed, verify, crop_padding, hflip)


TORCHVISION = {  # name: (torchvision class, number of classes)
    "mnist": ("MNIST", 10),
    "fashion_mnist": ("FashionMNIST", 10),
    "cifar10": ("CIFAR10", 10),
    "cifar100": ("CIFAR100", 100),
}


def _torchvision_class(name: str, verify: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[name][0])
    if verify or not hasattr(cls, "train_list"):
        return cls
    # CIFAR checks every file's md5; `verify: false` keeps the check that the files exist.
    return type(cls.__name__, (cls,), {
        "train_list": [[f, None] for f, _ in cls.train_list],
        "test_list": [[f, None] for f, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def _torchvision_splits(name: str, data_dir: str, download: bool, val_fraction: float, split_seed: int,
                        verify: bool, crop_padding: int, hflip: bool) -> RawSplits:
    """The dataset's train and test arrays, read by torchvision's class once and then from a cache
    (keyed by the files' sizes and times) that spares later runs the torchvision import."""
    root = Path(data_dir).expanduser().resolve()
    files = dataset_files(name, data_dir)
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    cached = root / "dlrun-cache" / f"{name}-{_key([stamp, verify])}.npz"  # missing files: a new key, a miss
    read = lambda: _read_torchvision(name, root, download, verify, files)  # noqa: E731
    if not download and not cached.is_file() and any(not f.is_file() for f in files):
        read()  # raises the error that lists the missing files, which matters more than a cache it cannot write
    arrays = _cached(cached, read, "dataset.data_dir", data_dir)
    rest, held = _split(arrays["train_x"], arrays["train_y"], val_fraction, split_seed)
    return RawSplits(name, rest, held, (arrays["test_x"], arrays["test_y"]), num_outputs=TORCHVISION[name][1],
                     crop_padding=crop_padding, hflip=hflip, classes=[str(c) for c in arrays["classes"]])


def _read_torchvision(name: str, root: Path, download: bool, verify: bool, files: list[Path]) -> dict[str, np.ndarray]:
    cls = _torchvision_class(name, verify)
    made = sorted({q for f in files for q in f.parents if q.is_relative_to(root) and not q.exists()},
                  key=lambda q: len(q.parts), reverse=True)  # the folders (the data dir too) a failed download
    # would leave, deepest first
    try:
        if download and any(not f.is_file() for f in files):
            offline = unreachable(getattr(cls, "mirrors", None) or [cls.url])
            if offline:
                raise offline
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except Exception as err:  # torchvision raises RuntimeError when files are missing or fail md5, URLError offline
        for folder in made:  # nothing of a failed download stays behind
            with suppress(OSError):
                folder.rmdir()
        raise ConfigError(unreadable(name, root, files, download, verify, err)) from None
    def images(ds) -> np.ndarray:
        x = np.asarray(ds.data)
        return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, C, H, W), uint8

    arrays = {"train_x": images(train), "train_y": np.asarray(train.targets, dtype=np.int64),
              "test_x": images(test), "test_y": np.asarray(test.targets, dtype=np.int64),
              "classes": np.asarray(train.classes, dtype=str)}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise ConfigError(f"dataset={name}: the {split} files under {root} hold {len(arrays[f'{split}_x']):,} "
                              f"images but {len(arrays[f'{split}_y']):,} labels; replace them with a matching pair")
    return arrays


def unreachable(urls: Sequence[str], timeout: float = 5.0) -> ConnectionError | None:
    """None when a host serving `urls` takes a connection within `timeout` seconds, else why none does (each host's
    error). The name lookup counts towards the limit (a socket's own timeout leaves it out): without a network, a
    download fails within seconds instead of after each mirror's lookups and connection attempts."""
    import socket
    import threading
    import urllib.parse

    errors = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        outcome: list[OSError | None] = []

        def connect() -> None:
            try:
                socket.create_connection(address, timeout=timeout).close()
                outcome.append(None)
            except OSError as err:
                outcome.append(err)

        thread = threading.Thread(target=connect, daemon=True)  # a lookup that hangs is left behind, not waited for
        thread.start()
        thread.join(timeout)
        if outcome == [None]:
            return None
        hung = not outcome or isinstance(outcome[0], TimeoutError)  # the lookup, or the connection itself
        errors.append(f"{address[0]}:{address[1]}: {f'no answer within {timeout:g} s' if hung else outcome[0]}")
    return ConnectionError("; ".join(errors))


def unreadable(name: str, root: Path, files: list[Path], download: bool, verify: bool, err: Exception) -> str:
    """Why torchvision could not read the dataset, and the fix: missing files (download them), a failed
    download (its cause), or files that fail torchvision's md5 check (dataset.verify=false)."""
    missing = [p for p in files if not p.is_file()]
    if download and missing:
        cause = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, OSError)), None)
        # torchvision's MNIST tries its mirrors and raises one RuntimeError that ends with the last mirror's error
        reason = f"{type(cause).__name__}: {cause}" if cause else (str(err).strip().splitlines() or [repr(err)])[-1]
        return (f"dataset={name}: the download into {root} failed ({reason}); without a network, put the "
                f"files there yourself: {', '.join(str(p.relative_to(root)) for p in files)}")
    if missing:
        return missing_files(name, root, missing)
    if verify and name.startswith("cifar"):
        return (f"dataset={name}: the files under {root} fail torchvision's md5 check ({err}); "
                "dataset.verify=false reads them without it")
    sizes = ", ".join(f"{p.relative_to(root)} ({p.stat().st_size:,} bytes)" for p in files)
    reason = (str(err).strip().splitlines() or [""])[0]
    return (f"dataset={name}: torchvision cannot read the files under {root} ({type(err).__name__}: {reason}); "
            f"they may be damaged or cut short: {sizes}")


def check_sizes(name: str, sizes: dict[str, int]) -> None:
    """No split is empty (a run needs samples to train, validate and test on)."""
    empty = [split for split, n in sizes.items() if n == 0]
    if empty:
        shown = ", ".join(f"{split} {n:,}" for split, n in sizes.items())
        raise ConfigError(f"dataset {name}: the {empty[0]} split is empty ({shown}); give it more samples, or change "
                          "dataset.val_fraction / dataset.test_fraction")


def decode_image(path: str, size: Sequence[int], channels: int) -> np.ndarray:
    """One image file as a (C, H, W) uint8 array, resized to `size` (H, W)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
        arr = np.array(img, dtype=np.uint8)  # a writable copy
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def decoded(path: str, size: Sequence[int], channels: int) -> np.ndarray:
    """`decode_image` of a file in the user's image folder: one that Pillow cannot read is a one-line error
    naming it."""
    from PIL import UnidentifiedImageError

    try:
        return decode_image(path, size, channels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # what Pillow raises for bad files
        raise ConfigError(f"{path}: not an image Pillow can read ({type(err).__name__}); remove it from the "
                          "image folder, or convert it") from None


def _scan(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Image files in class sub-folders of `folder`: (files, labels, classes)."""
    classes = classes or sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        sub = folder / name
        found = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if sub.is_dir() else []
        files += [str(p) for p in found]
        labels += [label] * len(found)
    return files, labels, classes


def load_imagefolder(
    root: str, image_size: Sequence[int], channels: int, val_fraction: float, test_fraction: float,
    split_seed: int, in_memory_limit: int, workers: int, cache_dir: str, crop_padding: int, hflip: bool,
) -> RawSplits:
    """The user's images in class sub-folders: `root/<class>/*.png`, split deterministically;
    or `root/train/<class>/`, `root/val/<class>/` (and optionally `root/test/<class>/`).

    Up to `in_memory_limit` images are decoded once (cached under `cache_dir`) and held in
    memory; larger folders are streamed through a DataLoader with `workers` processes.
    """
    base = Path(root).expanduser().resolve()
    size = (int(image_size[0]), int(image_size[1]))
    if (base / "train").is_dir() and (base / "val").is_dir():
        files, labels, classes = _scan(base / "train")
        parts = {"train": (files, labels), "val": _scan(base / "val", classes)[:2]}
        parts["test"] = _scan(base / "test", classes)[:2] if (base / "test").is_dir() else parts["val"]
    else:
        files, labels, classes = _scan(base)
        idx = np.arange(len(files))
        stratify = np.asarray(labels)
        (rest, _), (test, _) = _split(idx, stratify, test_fraction, split_seed)
        (train, _), (val, _) = _split(rest, stratify[rest], val_fraction / (1.0 - test_fraction), split_seed)
        parts = {name: ([files[i] for i in sel], [labels[i] for i in sel])
                 for name, sel in (("train", train), ("val", val), ("test", test))}
    if len(classes) < 2 or not parts["train"][0]:
        raise ConfigError(f"dataset.root={root}: expected image files in at least two class sub-folders")
    check_sizes(f"imagefolder:{base.name}", {name: len(f) for name, (f, _) in parts.items()})

    total = sum(len(f) for f, _ in parts.values())
    if total > in_memory_limit:
        splits = {name: ImageFiles(f, lab, size, channels) for name, (f, lab) in parts.items()}
    else:
        stamp = [(path, os.stat(path).st_mtime_ns) for paths, _ in parts.values() for path in paths]
        cache = Path(cache_dir).expanduser().resolve() / "imagefolder" / f"{_key([stamp, size, channels])}.npz"

        def decode() -> dict[str, np.ndarray]:
            out = {}
            for name, (f, lab) in parts.items():
                out[f"{name}_x"] = np.stack([decoded(p, size, channels) for p in f])
                out[f"{name}_y"] = np.asarray(lab, dtype=np.int64)
            return out

        arrays = _cached(cache, decode, "dataset.cache_dir", cache_dir)
        splits = {name: (arrays[f"{name}_x"], arrays[f"{name}_y"]) for name in parts}
    return RawSplits(f"imagefolder:{base.name}", splits["train"], splits["val"], splits["test"],
                     num_outputs=len(classes), crop_padding=crop_padding, hflip=hflip, workers=workers, classes=classes)
