"""Loop overhead: dlrun's training epoch versus a plain PyTorch loop written here.

Same model, same data already in memory on the device, same batch size and order,
same optimizer, same threads, same metrics. The plain loop is the careful one a person
writes: shuffle, index, forward, cross-entropy, backward, step, with the running loss
and accuracy kept on the device (no .item() per step). dlrun's `fit` additionally
watches for non-finite losses, its checkpoint/stop/log points, warmup and accumulation.
Epochs of the two alternate (ABBA), and the fastest epoch of each counts.

    python bench/loop_overhead.py [--samples N] [--epochs 8] [--device cpu|cuda] [--models cnn,rnn,mlp]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from dlrun.data import Data, DataSpec, TensorSplit, epoch_generator
from dlrun.distributed import SINGLE
from dlrun.models import CNN, MLP, RNN
from dlrun.train import LoopSettings, Parts, fit

MODELS = {
    # the classic small CNN: conv32-pool-conv64-pool-fc128
    "cnn": lambda: CNN((1, 28, 28), 10, channels=[32, 64], batch_norm=False, dropout=0.0, hidden=128),
    "rnn": lambda: RNN((1, 28, 28), 10, cell="lstm", hidden_size=128),  # rows as time steps
    "mlp": lambda: MLP((1, 28, 28), 10, hidden=[64, 128, 64], batch_norm=True, dropout=0.0),
}

DEFAULT_SAMPLES = {"cnn": 3000, "rnn": 6000, "mlp": 40000}


def plain_epoch(model, opt, x, y, batch_size, epoch, sync):
    model.train()
    order = torch.randperm(len(y), generator=epoch_generator(0, epoch)).to(x.device)
    total = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    started = time.perf_counter()
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        xb, yb = x[idx], y[idx]
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


def measure(name: str, samples: int, epochs: int, batch_size: int, device: torch.device) -> dict:
    x, y, data, sync = synthetic(samples, device)
    torch.manual_seed(0)
    plain_model = MODELS[name]().to(device)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    ours = MODELS[name]().to(device)
    parts = Parts(ours, torch.optim.Adam(ours.parameters(), lr=1e-3))
    plain_times, ours_times = [], []
    for epoch in range(1, epochs + 1):
        settings = LoopSettings(epochs=epoch, batch_size=batch_size, eval_batch_size=batch_size, seed=0,
                                eval_every=10**9, log_every=50, monitor="train/loss", monitor_mode="min")
        runs = [lambda: plain_times.append(plain_epoch(plain_model, plain_opt, x, y, batch_size, epoch, sync)),
                lambda: ours_times.append(dlrun_epoch(parts, data, settings, epoch, sync))]
        for run in runs if epoch % 2 else runs[::-1]:  # alternate who goes first: the machine drifts
            run()
    plain, ours_t = samples / min(plain_times), samples / min(ours_times)
    return {"model": name, "plain_samples_per_s": plain, "dlrun_samples_per_s": ours_t, "ratio": ours_t / plain}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, help="per epoch (default: about one second of training per model)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each loop; the fastest counts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="cnn,rnn,mlp")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = [measure(m, args.samples or DEFAULT_SAMPLES[m], args.epochs, args.batch_size, device)
               for m in args.models.split(",")]
    print(f"{'model':<6}{'plain samples/s':>17}{'dlrun samples/s':>17}{'ratio':>8}   (device {device}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size})")
    for r in results:
        print(f"{r['model']:<6}{r['plain_samples_per_s']:>17,.0f}{r['dlrun_samples_per_s']:>17,.0f}{r['ratio']:>8.3f}")
    print(json.dumps({"bench": "loop_overhead", "device": str(device), "results": results}))
    return results


if __name__ == "__main__":
    main()
