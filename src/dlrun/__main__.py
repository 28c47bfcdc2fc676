"""The `dlrun` command, and `python -m dlrun ...` (which behaves exactly like it).

Until a run takes over SIGINT (it then stops at the end of a step, see run.stop_on_signals),
Ctrl-C ends the process at once with one line and status 130. Raised as KeyboardInterrupt
instead, it would unwind through Hydra's and OmegaConf's code, which can turn it into other
errors with tracebacks; nothing of a run exists yet to be saved.
"""

import os
import signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    sys.stderr.write("dlrun: interrupted before the run started\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted)
    from dlrun.cli import main as run_command

    run_command()


if __name__ == "__main__":
    main()
