"""DDP loop overhead: dlrun's `fit` on N ranks versus a plain PyTorch DDP loop written here.

Both run in the same N processes (gloo on the CPU, NCCL on CUDA) on the same data in memory:
the same model in DistributedDataParallel, the same optimizer, each global batch cut into one
contiguous slice per rank. The plain loop is the careful one a person writes: index its own
slice, forward, cross-entropy, backward (DDP's all-reduce), step, running loss and accuracy on
the device, summed over the ranks at the end of the epoch. dlrun's `fit` adds what makes it
match a single-process run (loss weighting for uneven slices; it cuts the slice from the whole
global batch) and its stop agreement every `log_every` steps. Epochs alternate (ABBA) and the
fastest epoch of each counts.

    python bench/ddp_overhead.py [--processes 2] [--samples N] [--epochs 6] [--device cpu|cuda] [--models cnn,mlp]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import loop_settings
from loop_overhead import DEFAULT_SAMPLES, MODELS, dlrun_epoch, synthetic

from dlrun import distributed
from dlrun.config.schema import cpu_share
from dlrun.data import epoch_generator
from dlrun.train import Parts


def plain_epoch(model, opt, x, y, batch_size, epoch, ranks, sync):
    model.train()
    order = torch.randperm(len(y), generator=epoch_generator(0, epoch)).to(x.device)
    totals = torch.zeros(2, device=x.device)  # [loss sum, correct]
    started = time.perf_counter()
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        lo, hi = len(idx) * ranks.rank // ranks.world, len(idx) * (ranks.rank + 1) // ranks.world
        xb, yb = x[idx[lo:hi]], y[idx[lo:hi]]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        totals[0] += loss.detach() * len(yb)
        totals[1] += (logits.detach().argmax(dim=1) == yb).sum()
    dist.all_reduce(totals)
    totals.tolist()
    sync()
    return time.perf_counter() - started


def measure(name: str, samples: int, epochs: int, batch_size: int, device: torch.device, ranks) -> dict:
    x, y, data, sync = synthetic(samples, device)
    torch.manual_seed(0)
    plain_model = distributed.wrap(MODELS[name]().to(device), device)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    ours = MODELS[name]().to(device)
    parts = Parts(ours, torch.optim.Adam(ours.parameters(), lr=1e-3), ddp=distributed.wrap(ours, device))
    plain_times, ours_times = [], []
    for epoch in range(1, epochs + 1):
        settings = loop_settings(epochs=epoch, batch_size=batch_size, eval_batch_size=batch_size, seed=0,
                                 eval_every=10**9, log_every=50, monitor="train/loss", monitor_mode="min")
        runs = [lambda: plain_times.append(plain_epoch(plain_model, plain_opt, x, y, batch_size, epoch, ranks, sync)),
                lambda: ours_times.append(dlrun_epoch(parts, data, settings, epoch, sync, ranks))]
        for run in runs if epoch % 2 else runs[::-1]:  # alternate who goes first: the machine drifts
            dist.barrier()
            run()
    plain, ours_t = samples / min(plain_times), samples / min(ours_times)
    return {"model": name, "plain_samples_per_s": plain, "dlrun_samples_per_s": ours_t, "ratio": ours_t / plain}


def rank(ranks, args) -> None:
    with distributed.process_group(ranks):
        measure_all(ranks, args)


def measure_all(ranks, args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(cpu_share(ranks.world))
    results = [measure(m, args.samples or DEFAULT_SAMPLES[m], args.epochs, args.batch_size, device, ranks)
               for m in args.models.split(",")]
    if ranks.is_main:
        print(f"{'model':<6}{'plain DDP samples/s':>21}{'dlrun samples/s':>17}{'ratio':>8}   ({ranks.world} processes, "
              f"device {device.type}, {torch.get_num_threads()} threads each, global batch {args.batch_size})")
        for r in results:
            print(f"{r['model']:<6}{r['plain_samples_per_s']:>21,.0f}{r['dlrun_samples_per_s']:>17,.0f}"
                  f"{r['ratio']:>8.3f}")
        print(json.dumps({"bench": "ddp_overhead", "device": device.type, "processes": ranks.world,
                          "results": results}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--samples", type=int, help="per epoch (default: as bench/loop_overhead.py)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each loop; the fastest counts")
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="cnn,mlp")
    args = parser.parse_args(argv)
    distributed.spawn(rank, args.processes, args)


if __name__ == "__main__":
    main()
