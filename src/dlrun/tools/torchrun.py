"""`dlrun-torchrun [torchrun's options] -m dlrun ...`: torchrun, with its rendezvous failures as one line.

Under plain `torchrun` the rendezvous of several nodes happens in torchrun's agent, before any dlrun code runs:
an endpoint that cannot be reached, or nodes that never all join, end in torchrun's traceback (about 80 lines,
after its timeouts). `dlrun-torchrun` takes exactly torchrun's arguments and runs torchrun itself
(`torch.distributed.run`), so workers, restarts and exit codes are torchrun's; only a failed rendezvous becomes one
line naming the option to check, with exit status 1. c10d's own C++ messages about each failed connection
attempt are left out of the console (TORCH_CPP_LOG_LEVEL=FATAL, unless set already; the workers get the
environment as it was).
"""

from __future__ import annotations

import os
import sys


def message(args, err: BaseException) -> str:
    """The one line for a rendezvous that failed with `err`, from torchrun's parsed `args`."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError

    endpoint = f"--rdzv-endpoint={args.rdzv_endpoint or '(none)'} (--rdzv-backend={args.rdzv_backend})"
    if isinstance(err, RendezvousConnectionError):
        cause = f": {str(err.__cause__).rstrip('.')}" if err.__cause__ else ""
        return (f"dlrun-torchrun: error: no rendezvous at {endpoint}{cause}; the endpoint is node 0's host:port, "
                "which every node must reach (is its torchrun started there, the port open?)")
    if isinstance(err, RendezvousTimeoutError):
        return (f"dlrun-torchrun: error: at {endpoint}, fewer than --nnodes={args.nnodes} nodes joined before the "
                "rendezvous' join_timeout (--rdzv-conf=join_timeout=SECONDS, default 600): start a torchrun on "
                "each node with the same --rdzv-id and endpoint")
    return f"dlrun-torchrun: error: the rendezvous at {endpoint} failed: {type(err).__name__}: {err}"


def main(argv: list[str] | None = None) -> None:
    cpp_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = cpp_level or "FATAL"  # read once, when torch's libraries load
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    if cpp_level is None:
        del os.environ["TORCH_CPP_LOG_LEVEL"]  # the workers log as under torchrun
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except RendezvousError as err:
        raise SystemExit(message(args, err)) from None


if __name__ == "__main__":
    main()
