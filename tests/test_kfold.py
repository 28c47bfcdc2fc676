"""k-fold cross-validation: `dlrun -m dataset.folds=K dataset.fold=0,...,K-1`, merged by dlrun-report as seeds are.
Folds are a deterministic function of the split seed, disjoint, covering the training data, stratified for
classification; the test split never enters a fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CPU, compose_config, read_summary
from dlrun.data import RawSplits, build_dataset, fold_of, k_fold


def test_folds_are_disjoint_cover_every_sample_and_keep_each_class_share():
    y = np.random.default_rng(1).integers(0, 3, 1000)
    which = fold_of(y, 5, seed=7, stratify=True)
    assert sorted(set(which.tolist())) == [0, 1, 2, 3, 4] and len(which) == len(y)  # each sample in one fold
    sizes = np.bincount(which)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):  # each class spread evenly over the folds
        per_fold = np.bincount(which[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(which, fold_of(y, 5, seed=7, stratify=True))  # a function of the seed
    assert not np.array_equal(which, fold_of(y, 5, seed=8, stratify=True))
    regression = fold_of(np.zeros((10, 3)), 3, seed=0, stratify=False)
    assert sorted(np.bincount(regression).tolist()) == [3, 3, 4]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_k_validation_splits_partition_the_training_data_and_leave_the_test_split(task):
    """Samples numbered by their x (train 0..99, val 100..129, test 130..149): which land where."""
    ids = np.arange(150, dtype=np.float32)[:, None]
    y = np.arange(150) % 3 if task == "classification" else np.arange(300, dtype=np.float32).reshape(150, 2)
    raw = RawSplits("toy", (ids[:100], y[:100]), (ids[100:130], y[100:130]), (ids[130:], y[130:]), 3, task)
    seen: set[int] = set()
    for k in range(4):
        split = k_fold(raw, 4, k, seed=0)
        val, train = set(split.val[0].ravel().tolist()), set(split.train[0].ravel().tolist())
        assert not val & train and val | train == set(range(130)) and not val & seen
        assert np.array_equal(split.val[1], y[split.val[0].ravel().astype(int)])  # labels stay with their samples
        seen |= val
        assert split.test is raw.test
    assert seen == set(range(130))


def test_a_fold_of_digits_is_read_through_the_dataset_config():
    cpu = torch.device("cpu")
    plain = build_dataset(compose_config("dataset=digits").dataset, cpu)
    sizes = [build_dataset(compose_config("dataset=digits", "dataset.folds=4", f"dataset.fold={k}").dataset,
                           cpu).sizes() for k in range(4)]
    pooled = plain.sizes()["train"] + plain.sizes()["val"]
    assert sum(s["val"] for s in sizes) == pooled and all(s["train"] + s["val"] == pooled for s in sizes)
    assert all(s["test"] == plain.sizes()["test"] for s in sizes)


def test_a_k_fold_sweep_is_one_row_of_dlrun_report(cli, tmp_path):
    cli("dlrun", "-m", "hydra.sweep.dir=sweep", "dataset.folds=3", "dataset.fold=0,1,2", "trainer.epochs=1",
        "trainer.model_summary=false", *CPU, check=True)
    accs = [read_summary(tmp_path / "sweep" / str(k))["best"]["val/acc"] for k in range(3)]
    sizes = [read_summary(tmp_path / "sweep" / str(k))["data"]["sizes"]["val"] for k in range(3)]
    assert sum(sizes) == 1259 + 179 and len(set(accs)) > 1  # the folds are the digits' training data, validated apart
    cli("dlrun-report", "sweep", "--csv", "report.csv", check=True)
    lines = (tmp_path / "report.csv").read_text().splitlines()
    assert len(lines) == 2  # the header and one configuration
    header, row = lines[0].split(","), lines[1].split(",")
    assert row[header.index("n")] == "3"


@pytest.mark.parametrize("overrides, said", [
    (["dataset.folds=5", "dataset.fold=5"], "dataset.fold=5 is invalid: must be in [0, 5) with dataset.folds=5"),
    (["dataset.folds=1"], "dataset.folds=1 is invalid: must be >= 2"),
    (["dataset.fold=2"], "dataset.fold=2 is invalid: is used with dataset.folds=K"),
])
def test_a_fold_outside_the_folds_is_one_line(cli, tmp_path, overrides, said):
    ran = cli("dlrun", *overrides, *CPU)
    assert ran.returncode != 0 and said in ran.stderr, ran.stderr
    assert not (tmp_path / "outputs").exists()
