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
import statistics
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
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each side, alternating")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)  # both sides on one thread: the comparison is the pipeline, not the BLAS
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        if not (Path(data_dir) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            write_mnist(Path(data_dir), n_train=args.samples, n_test=max(10, args.samples // 6))
        sides = {"dlrun": lambda: dlrun_epoch(data_dir, args.batch_size, device),
                 "torchvision": lambda: torchvision_epoch(data_dir, args.batch_size, device)}
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for rep in range(args.repeats):  # alternating: neither side always goes first
            for name in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
                n, seconds = sides[name]()
                rates[name].append(n / seconds)
    med = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "bench": "data_pipeline",
        "batch_size": args.batch_size,
        "device": str(device),
        "repeats": args.repeats,
        "dlrun_samples_per_s": med["dlrun"],
        "torchvision_samples_per_s": med["torchvision"],
        **{f"{name}_range": [min(r), max(r)] for name, r in rates.items()},
        "ratio": med["dlrun"] / med["torchvision"],
    }
    print(f"samples/s, median over {args.repeats} epochs each (min-max)")
    for name, label in (("dlrun", "dlrun in-memory (TensorSplit)"), ("torchvision", "torchvision MNIST+ToTensor+DataLoader")):
        print(f"  {label:<38}{med[name]:>12,.0f}  ({min(rates[name]):,.0f}-{max(rates[name]):,.0f})")
    print(f"ratio (dlrun / torchvision): {result['ratio']:.1f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
