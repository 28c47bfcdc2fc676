"""Sweep throughput: N small jobs run one after another versus `launcher=local_parallel`.

Both are real `dlrun -m` sweeps of the same jobs (seeds 0..N-1 of a short CNN run on
digits); the parallel one runs jobs in as many processes as there are cores, each job
limited to its share of the CPU threads.

    python bench/sweep.py [--jobs 4] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import DLRUN, paired, report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    args = parser.parse_args(argv)
    seeds = ",".join(str(i) for i in range(args.jobs))
    common = ["-m", f"trainer.seed={seeds}", f"trainer.epochs={args.epochs}", "device=cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        sequential, parallel = f"{args.jobs} jobs, one after another", f"{args.jobs} jobs, launcher=local_parallel"
        times = paired({sequential: lambda rep: [DLRUN, *common, f"hydra.sweep.dir=sequential{rep}"],
                        parallel: lambda rep: [DLRUN, *common, "launcher=local_parallel", f"hydra.sweep.dir=parallel{rep}"]},
                       cwd, args.repeats)
    return report("sweep", times, "speed-up of the parallel sweep", sequential, parallel,
                  {"jobs": args.jobs, "epochs": args.epochs, "cores": os.cpu_count()})

if __name__ == "__main__":
    main()
