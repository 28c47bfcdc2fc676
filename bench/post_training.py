"""After training: how long a run spends between its last training step and its end (test evaluation
and analysis, cost and latency, checkpoint, plots), as a share of its training time.

Runs of one thread each: the default run (`dlrun`: digits CNN, 15 epochs) and one epoch of the
default CNN on MNIST-format files the bench writes (60k images, as MNIST), that epoch also with
`trainer.eval_batch_size=512` (the default before it became 128: validation and test evaluation in
larger batches). Each run's summary says both figures (`train.seconds`, `after_training_s`); the
medians over --repeats repetitions are printed, the runs of a repetition in a rotating order.

    python bench/post_training.py [--repeats 2] [--samples 60000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DLRUN

MNIST_EPOCH = ["dataset=mnist", "trainer.epochs=1"]
RUNS = {"default run (digits CNN, 15 epochs)": [], "MNIST CNN, one epoch": MNIST_EPOCH,
        "MNIST CNN, one epoch, eval_batch_size=512": [*MNIST_EPOCH, "trainer.eval_batch_size=512"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=60000, help="MNIST-format training images to write")
    args = parser.parse_args(argv)
    from datafiles import write_mnist

    shares: dict[str, list[tuple[float, float]]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_mnist(work / "data", n_train=args.samples, n_test=max(10, args.samples // 6))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DLRUN_DATA_DIR": str(work / "data")}
        runs = list(enumerate(RUNS.items()))
        for rep in range(args.repeats):
            for i, (name, overrides) in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                folder = work / f"run{rep}-{i}"
                proc = subprocess.run([DLRUN, *overrides, "device=cpu", "device.threads=1", f"hydra.run.dir={folder}"],
                                      cwd=work, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"dlrun {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
                summary = json.loads((folder / "summary.json").read_text())
                shares[name].append((summary["train"]["seconds"], summary["after_training_s"]))
    result = {"bench": "post_training", "threads": 1, "repeats": args.repeats}
    for name, pairs in shares.items():
        train, after = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        share = statistics.median(p[1] / p[0] for p in pairs)
        print(f"{name:<44} training {train:7.1f} s  after training {after:5.2f} s  ({100 * share:.1f}% of training)")
        result[name] = {"train_s": train, "after_training_s": after, "share": share}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
