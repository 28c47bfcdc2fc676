"""The `dlrun` command, and `python -m dlrun ...` (which behaves exactly like it).

Loading Hydra and the schemas takes a moment; Ctrl-C during it is one line too, not a traceback.
"""

import signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    print("dlrun: interrupted before the run started", file=sys.stderr)
    raise SystemExit(128 + signum)


def main() -> None:
    previous = signal.signal(signal.SIGINT, _interrupted)
    from dlrun.cli import main as run_command

    signal.signal(signal.SIGINT, previous)
    run_command()


if __name__ == "__main__":
    main()
