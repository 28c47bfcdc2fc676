"""Writers of small datasets in the real on-disk formats, for tests and benchmarks.

Images carry their class as a bright patch at a class-specific place, so that a
model can learn them in an epoch or two; noise keeps them from being trivial copies.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def patterned_images(n: int, classes: int, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images of `shape` ((H, W) or (H, W, C)) and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
    h, w = shape[0], shape[1]
    cols = max(1, int(np.ceil(np.sqrt(classes))))
    ph, pw = max(1, h // (cols + 1)), max(1, w // (cols + 1))
    for i, label in enumerate(labels):
        r, c = divmod(int(label), cols)
        images[i, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = 255
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (the MNIST format): magic (0, 0, ubyte=0x08, ndim), big-endian dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """torchvision's layout: <root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""
    raw = root / folder / "raw"
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = patterned_images(n, 10, (28, 28), s)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


def write_cifar(root: Path, classes: int = 10, per_batch: int = 100, n_test: int = 200, seed: int = 0) -> Path:
    """The CIFAR python pickles: cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta;
    or, for 100 classes, cifar-100-python/train, test, meta."""
    def pickle_to(path: Path, obj: dict) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    def batch(n: int, s: int) -> tuple[np.ndarray, list[int]]:
        images, labels = patterned_images(n, classes, (32, 32, 3), s)
        return images.transpose(0, 3, 1, 2).reshape(n, 3072), labels.tolist()  # rows of R, G, B planes

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            data, labels = batch(per_batch, seed + i)
            pickle_to(folder / f"data_batch_{i}", {"data": data, "labels": labels})
        data, labels = batch(n_test, seed + 99)
        pickle_to(folder / "test_batch", {"data": data, "labels": labels})
        pickle_to(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, n, s in (("train", per_batch * 5, seed), ("test", n_test, seed + 99)):
            data, labels = batch(n, s)
            pickle_to(folder / name, {"data": data, "fine_labels": labels, "coarse_labels": [x // 5 for x in labels]})
        pickle_to(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)]})
    return folder


def write_image_folder(root: Path, classes: int = 3, per_class: int = 20, size: int = 16, seed: int = 0) -> Path:
    """PNG files in class sub-folders: <root>/class<k>/<i>.png."""
    from PIL import Image

    images, labels = patterned_images(classes * per_class, classes, (size, size, 3), seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root
