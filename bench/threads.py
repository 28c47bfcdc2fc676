"""Threads on a busy CPU: torch training steps with 1 and 2 threads, OpenMP's default wait policy
versus PASSIVE (what dlrun sets, see src/dlrun/cpus.py), on an idle machine and under an artificial
load (busy processes this bench starts and stops itself, one per core).

Each measurement is a fresh process (the wait policy is read when OpenMP loads), timing steps of a
small MLP (MNIST shape, batch 128, Adam) and of the digits CNN after a warm-up; the
configurations alternate, in a new order every repetition. Printed: the median step time of each
configuration over the repetitions with its min-max, and the ratios that decide dlrun's default.

    python bench/threads.py [--repeats 3] [--steps 150] [--model mlp|cnn]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

STEP = r"""
import os, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
if sys.argv[2] == "mlp":
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                            torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x = torch.randn(128, 1, 28, 28)
else:
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                            torch.nn.Flatten(), torch.nn.Linear(64 * 2 * 2, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x = torch.randn(64, 1, 8, 8)
y = torch.randint(0, 10, (len(x),))
opt = torch.optim.Adam(m.parameters())
def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
for _ in range(20):
    step()
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(1000 * sorted(times)[len(times) // 2])
"""

POLICIES = {"default": None, "PASSIVE": "PASSIVE"}


def measure(threads: int, policy: str | None, model: str, steps: int) -> float:
    """Median ms per step in a fresh process with this wait policy (None: OpenMP's default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", STEP, str(threads), model, str(steps)], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return float(out.stdout)


@contextmanager
def busy(n: int):
    """`n` processes spinning on a core each, for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    args = parser.parse_args()
    configs = [(t, p) for t in (1, 2) for p in POLICIES]
    results: dict[str, dict[tuple[int, str], list[float]]] = {"idle": {c: [] for c in configs},
                                                               "busy": {c: [] for c in configs}}
    cores = len(os.sched_getaffinity(0))
    print(f"load average before: {os.getloadavg()[0]:.2f} ({cores} cores)")
    for rep in range(args.repeats):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]  # a new order each repetition
        for condition in ("idle", "busy"):
            with busy(cores if condition == "busy" else 0):
                for threads, policy in order:
                    results[condition][(threads, policy)].append(measure(threads, POLICIES[policy], args.model,
                                                                          args.steps))
    summary = {}
    print(f"{args.model} step, ms: median over {args.repeats} repetitions (min-max)")
    for condition, table in results.items():
        for (threads, policy), times in table.items():
            median = statistics.median(times)
            summary[f"{condition} {threads} threads {policy}"] = median
            print(f"  {condition:<5} {threads} threads  wait policy {policy:<8} {median:8.2f}  ({min(times):.2f}-{max(times):.2f})")
    ratios = {
        "busy: 2 threads default / PASSIVE (collapse avoided)": summary["busy 2 threads default"] / summary["busy 2 threads PASSIVE"],
        "idle: 2 threads PASSIVE / default (cost when idle)": summary["idle 2 threads PASSIVE"] / summary["idle 2 threads default"],
        "busy: 2 threads PASSIVE / 1 thread PASSIVE": summary["busy 2 threads PASSIVE"] / summary["busy 1 threads PASSIVE"],
    }
    for label, ratio in ratios.items():
        print(f"{label}: {ratio:.2f}x")
    print(json.dumps({"bench": "threads", "model": args.model, "cores": cores, **summary,
                      **{k.split(":")[0] + ": " + k.split(": ")[1]: v for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
