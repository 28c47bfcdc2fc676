"""Loop overhead and fast paths: dlrun's training epoch versus plain PyTorch loops written here.

Same model, same data already in memory on the device, same batch size and order, same optimizer,
same threads, same metrics. Three sides:
- plain (naive): the careful loop a person writes (shuffle, index, forward, cross-entropy, backward,
  step; running loss and accuracy kept on the device), with PyTorch's defaults: NCHW tensors and the
  unfused Adam step;
- plain (fast paths): the same loop with the fast paths dlrun takes by default (channels-last for 2-D
  CNNs on this device, torch's fused Adam kernel);
- dlrun: `fit` with its defaults (device.use_channels_last, optim.fused_kernels), which additionally
  watches for non-finite losses, its checkpoint/stop/log points, warmup and accumulation.
The sides alternate in a new order each epoch; median and min-max samples/s over the epochs.

    python bench/loop_overhead.py [--samples N] [--epochs 8] [--device cpu|cuda] [--models cnn,rnn,mlp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from common import loop_settings

from dlrun.data import Data, DataSpec, TensorSplit, channels_last, epoch_generator
from dlrun.device import amp_dtype, use_channels_last
from dlrun.distributed import SINGLE
from dlrun.models import CNN, MLP, RNN
from dlrun.optim import fused_kernels
from dlrun.train import Parts, fit

BLOCK = {"kernel": 3, "stride": 1, "padding": "valid", "pool": "max", "pool_size": 2, "dropout": 0.0}
MODELS = {
    # the brief's network, Keras's MNIST example (experiment=mnist_keras_cnn): conv32 valid - pool -
    # conv64 valid - pool - dropout 0.5 - dense 10, 34,826 parameters
    "cnn": lambda: CNN((1, 28, 28), 10, blocks=[{**BLOCK, "channels": 32}, {**BLOCK, "channels": 64}],
                       batch_norm=False, dropout=0.0, hidden=0, head="flatten", head_dropout=0.5),
    "rnn": lambda: RNN((1, 28, 28), 10, cell="lstm", hidden_size=128, num_layers=1, bidirectional=False, dropout=0.0,
                       readout="last"),  # rows as time steps
    "mlp": lambda: MLP((1, 28, 28), 10, hidden=[64, 128, 64], batch_norm=True, dropout=0.0),
}

DEFAULT_SAMPLES = {"cnn": 3000, "rnn": 6000, "mlp": 40000}


def plain_epoch(model, opt, x, y, batch_size, epoch, sync, amp=None):
    model.train()
    order = torch.randperm(len(y), generator=epoch_generator(0, epoch)).to(x.device)
    total = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    started = time.perf_counter()
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        xb, yb = x[idx], y[idx]
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(yb)
        correct += (logits.detach().argmax(dim=1) == yb).sum()
    total.item(), correct.item()
    sync()
    return time.perf_counter() - started


def dlrun_epoch(parts, data, settings, epoch, sync, ranks=SINGLE):
    from dlrun.train import TrainState

    started = time.perf_counter()
    fit(parts, data, settings, [], lambda s, b: None, state=TrainState(epoch=epoch - 1, step=0), ranks=ranks)
    sync()
    return time.perf_counter() - started


def synthetic(samples: int, device: torch.device):
    """MNIST-shaped random data on the device (a one-sample val split), and the device's sync."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (samples,), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data = Data(DataSpec((1, 28, 28), 10), {"train": TensorSplit(x, y), "val": TensorSplit(x[:1], y[:1])})
    return x, y, data, sync


def side(name: str, device: torch.device, fast: bool, amp: torch.dtype | None):
    """A fresh model (same seed) and its Adam; with `fast`, dlrun's default fast paths."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    nhwc = fast and use_channels_last(None, model, (1, 28, 28), device, amp)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=fast and fused_kernels(model)), nhwc


def measure(name: str, samples: int, epochs: int, batch_size: int, device: torch.device, precision: str) -> dict:
    x, y, data, sync = synthetic(samples, device)
    amp = amp_dtype(precision)
    naive_model, naive_opt, _ = side(name, device, False, amp)
    fast_model, fast_opt, nhwc = side(name, device, True, amp)
    x_fast = x.contiguous(memory_format=torch.channels_last) if nhwc else x
    ours, ours_opt, _ = side(name, device, True, amp)
    parts = Parts(ours, ours_opt)
    ours_data = channels_last(data) if nhwc else data
    times: dict[str, list[float]] = {"naive": [], "fast": [], "dlrun": []}
    for epoch in range(1, epochs + 1):
        settings = loop_settings(epochs=epoch, batch_size=batch_size, eval_batch_size=batch_size, seed=0,
                                 eval_every=10**9, log_every=50, monitor="train/loss", monitor_mode="min",
                                 precision=precision)
        runs = {"naive": lambda: plain_epoch(naive_model, naive_opt, x, y, batch_size, epoch, sync, amp),
                "fast": lambda: plain_epoch(fast_model, fast_opt, x_fast, y, batch_size, epoch, sync, amp),
                "dlrun": lambda: dlrun_epoch(parts, ours_data, settings, epoch, sync)}
        order = list(runs)[epoch % 3:] + list(runs)[:epoch % 3]  # a new order each epoch: the machine drifts
        for key in order:
            times[key].append(runs[key]())
    rates = {k: sorted(samples / t for t in v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"model": name, "channels_last": nhwc, **{f"{k}_samples_per_s": med[k] for k in med},
            **{f"{k}_range": [v[0], v[-1]] for k, v in rates.items()},
            "vs_naive": med["dlrun"] / med["naive"], "vs_fast": med["dlrun"] / med["fast"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, help="per epoch (default: about one second of training per model)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each side")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="cnn,rnn,mlp")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="autocast on both sides")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = [measure(m, args.samples or DEFAULT_SAMPLES[m], args.epochs, args.batch_size, device, args.precision)
               for m in args.models.split(",")]
    print(f"samples/s, median over {args.epochs} epochs (device {device}, {args.precision}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size})")
    print(f"{'model':<6}{'plain naive':>13}{'plain fast':>13}{'dlrun':>13}{'vs naive':>10}{'vs fast':>9}")
    for r in results:
        print(f"{r['model']:<6}{r['naive_samples_per_s']:>13,.0f}{r['fast_samples_per_s']:>13,.0f}"
              f"{r['dlrun_samples_per_s']:>13,.0f}{r['vs_naive']:>10.2f}{r['vs_fast']:>9.2f}")
    print(json.dumps({"bench": "loop_overhead", "device": str(device), "precision": args.precision,
                      "threads": torch.get_num_threads(),
                      "results": results}))
    return results


if __name__ == "__main__":
    main()
