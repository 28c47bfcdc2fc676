"""Data: dataset builders (`datasets.py`: raw splits, the .npz cache), batched augmentation on the
device (`augment.py`), and the pipeline that holds the splits on the training device and cuts
batches in an order that is a pure function of (seed, epoch) (`pipeline.py`).

The builders are exported here under the names configs and checkpoints use (`dlrun.data.load_digits`, ...).
"""

from dlrun.data.augment import Augment, Augment1D, Mix, batch_generator, build_augment, build_mix
from dlrun.data.datasets import (
    IMAGE_SUFFIXES,
    ImageFiles,
    RawSplits,
    decode_image,
    fold_of,
    k_fold,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_fashion_mnist,
    load_imagefolder,
    load_mnist,
    load_mnist1d,
    load_sequence,
)
from dlrun.data.pipeline import (
    Batch,
    Data,
    DataSpec,
    Split,
    StreamSplit,
    TensorSplit,
    batches,
    build_data,
    build_dataset,
    channels_last,
    epoch_generator,
    num_batches,
    quick_check_subsets,
)

__all__ = [
    "IMAGE_SUFFIXES", "Augment", "Augment1D", "Batch", "Data", "DataSpec", "ImageFiles", "Mix", "RawSplits", "Split",
    "StreamSplit", "TensorSplit", "batch_generator", "batches", "build_augment", "build_data", "build_dataset",
    "build_mix", "channels_last", "decode_image", "epoch_generator", "fold_of", "k_fold", "load_cifar10",
    "load_cifar100",
    "load_digits", "load_fashion_mnist", "load_imagefolder", "load_mnist", "load_mnist1d", "load_sequence",
    "num_batches", "quick_check_subsets",
]
