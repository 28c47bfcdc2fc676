"""Start-up: `dlrun --help` and `dlrun --cfg job` versus `python -c "import torch"`.

The CLI imports nothing heavy for these, so they should take a fraction of torch's import.

    python bench/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import DLRUN, median_time, report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command; the median counts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        torch_s = median_time([sys.executable, "-c", "import torch"], cwd, args.repeats)
        help_s = median_time([DLRUN, "--help"], cwd, args.repeats)
        cfg_s = median_time([DLRUN, "--cfg", "job"], cwd, args.repeats)
    return report(
        "startup",
        [('python -c "import torch"', torch_s), ("dlrun --help", help_s), ("dlrun --cfg job", cfg_s)],
        "import torch / dlrun --help", torch_s / help_s,
        {"cfg_ratio": torch_s / cfg_s},
    )


if __name__ == "__main__":
    main()
