"""Data pipeline: dlrun's in-memory loader versus torchvision's MNIST + ToTensor + DataLoader.

Both read the same MNIST-format IDX files (random images in torchvision's layout,
written here unless --data-dir already has them) and deliver one epoch of
normalised (batch, 1, 28, 28) float batches in a shuffled order to the device.
Prints a table and one JSON line; the ratio is what to compare, not the seconds.

    python bench/data_pipeline.py [--samples 60000] [--batch-size 128] [--data-dir DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT  # noqa: F401  (puts tests/ on the path for datafiles)
from datafiles import write_mnist

from dlrun.data import build_data, epoch_generator, load_mnist


def dlrun_epoch(data_dir: str, batch_size: int, device: torch.device) -> tuple[int, float]:
    data = build_data(load_mnist(data_dir, download=False, val_fraction=1 / 12, split_seed=0), device)
    train = data.splits["train"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    n = sum(len(y) for _, y in train.batches(batch_size, epoch_generator(0, 1)))
    sync()
    return n, time.perf_counter() - started


def torchvision_epoch(data_dir: str, batch_size: int, device: torch.device) -> tuple[int, float]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    loader = DataLoader(datasets.MNIST(data_dir, train=True, transform=tf), batch_size=batch_size, shuffle=True,
                        num_workers=0, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    n = 0
    for x, y in loader:  # to the device, as a training loop would
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=60000, help="training images to write (if writing)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-dir", help="where MNIST/raw/ is or will be written (default: a temp dir)")
    parser.add_argument("--device", default="cpu", help="where the batches are delivered")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)  # both sides on one thread: the comparison is the pipeline, not the BLAS
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        if not (Path(data_dir) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            write_mnist(Path(data_dir), n_train=args.samples, n_test=max(10, args.samples // 6))
        n_ours, t_ours = dlrun_epoch(data_dir, args.batch_size, device)
        n_tv, t_tv = torchvision_epoch(data_dir, args.batch_size, device)
    result = {
        "bench": "data_pipeline",
        "batch_size": args.batch_size,
        "device": str(device),
        "dlrun_samples_per_s": n_ours / t_ours,
        "torchvision_samples_per_s": n_tv / t_tv,
        "ratio": (n_ours / t_ours) / (n_tv / t_tv),
    }
    print(f"{'loader':<38}{'samples':>9}{'seconds':>10}{'samples/s':>14}")
    print(f"{'dlrun in-memory (TensorSplit)':<38}{n_ours:>9}{t_ours:>10.3f}{n_ours / t_ours:>14,.0f}")
    print(f"{'torchvision MNIST+ToTensor+DataLoader':<38}{n_tv:>9}{t_tv:>10.3f}{n_tv / t_tv:>14,.0f}")
    print(f"ratio (dlrun / torchvision): {result['ratio']:.1f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
