"""Datasets, normalisation and the in-memory batch order."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dlrun.data import batches, build_data, epoch_generator, load_digits, load_mnist1d, num_batches


def test_digits_splits_are_disjoint_and_sized():
    raw = load_digits(test_fraction=0.2, val_fraction=0.1, split_seed=0)
    sizes = [len(getattr(raw, s)[1]) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes == [1259, 179, 359]
    assert raw.train[0].shape[1:] == (1, 8, 8)
    # every class is present in the validation split (stratified)
    assert set(raw.val[1].tolist()) == set(range(10))
    rows = {s: {x.tobytes() for x in getattr(raw, s)[0]} for s in ("train", "val", "test")}
    assert not rows["val"] & rows["test"]


def test_normalisation_uses_training_statistics():
    data = build_data(load_digits(0.2, 0.1, 0), torch.device("cpu"))
    x_train = data.splits["train"].x
    assert abs(x_train.mean().item()) < 1e-5 and abs(x_train.std().item() - 1) < 1e-3
    assert data.spec.input_shape == (1, 8, 8) and data.spec.num_outputs == 10
    assert len(data.mean) == len(data.std) == 1 and 4 < data.mean[0] < 6  # raw pixel values are 0..16


def test_mnist1d_generated_offline_and_cached(tmp_path):
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    kwargs = dict(num_samples=5000, train_split=0.8, val_fraction=0.1, split_seed=0, generator_seed=42)
    raw = load_mnist1d(data_dir=str(tmp_path), **kwargs)
    assert (len(raw.train[1]) + len(raw.val[1]), len(raw.test[1])) == (4000, 1000)
    assert raw.train[0].shape[1:] == (1, 40)
    cached = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(cached) == 1
    # the second build reads the cache and gives the same arrays
    again = load_mnist1d(data_dir=str(tmp_path), **kwargs)
    np.testing.assert_array_equal(raw.test[0], again.test[0])
    # the generator's global reseeding does not leak into the caller's RNGs
    assert random.getstate() == py_state and (np.random.get_state()[1] == np_state).all()


def test_batch_order_is_a_function_of_seed_and_epoch():
    x = torch.arange(100.0)[:, None]
    y = torch.arange(100)

    def order(seed, epoch):
        return torch.cat([yb for _, yb in batches(x, y, 32, epoch_generator(seed, epoch))]).tolist()

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)
    assert sorted(order(3, 7)) == list(range(100))  # each sample once per epoch
    sizes = [len(yb) for _, yb in batches(x, y, 32, epoch_generator(0, 1))]
    assert sizes == [32, 32, 32, 4] and num_batches(100, 32) == 4


def test_unshuffled_batches_keep_order():
    x, y = torch.zeros(10, 1), torch.arange(10)
    assert torch.cat([yb for _, yb in batches(x, y, 4)]).tolist() == list(range(10))


@pytest.mark.slow  # a fresh interpreter shows what gets imported
def test_digits_are_scikit_learns_without_importing_it():
    import subprocess
    import sys

    code = ("import sys; from dlrun.data import load_digits; raw = load_digits(0.2, 0.1, 0); "
            "print('sklearn' in sys.modules, len(raw.train[0]) + len(raw.val[0]) + len(raw.test[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "1797"]
    from sklearn.datasets import load_digits as sk_digits

    from dlrun.data import load_digits

    raw, bunch = load_digits(0.2, 0.1, 0), sk_digits()
    images = np.concatenate([raw.train[0], raw.val[0], raw.test[0]])[:, 0]
    assert sorted(map(bytes, images.astype(np.float64))) == sorted(map(bytes, bunch.images))
