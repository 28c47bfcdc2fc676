"""Start-up: `dlrun --help` and `dlrun --cfg job` versus `python -c "import torch"`.

The CLI imports nothing heavy for these, so they should take a fraction of torch's import.

    python bench/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import DLRUN, paired, report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command, alternating; the median counts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        times = paired({'python -c "import torch"': lambda rep: [sys.executable, "-c", "import torch"],
                        "dlrun --help": lambda rep: [DLRUN, "--help"],
                        "dlrun --cfg job": lambda rep: [DLRUN, "--cfg", "job"]}, cwd, args.repeats)
    cfg_ratio = statistics.median(times['python -c "import torch"']) / statistics.median(times["dlrun --cfg job"])
    return report("startup", times, "import torch / dlrun --help", 'python -c "import torch"', "dlrun --help",
                  {"cfg_ratio": cfg_ratio})

if __name__ == "__main__":
    main()
