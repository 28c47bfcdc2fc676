"""Every error a user can act on, and the exit status of the process for each (and for signals).

A `DlrunError` is reported as one line (`dlrun: error: ...`), never as a traceback; anything
else is a bug and keeps its traceback. Light on purpose: the CLI and the Hydra plugins import it.
"""

from __future__ import annotations

import signal


class DlrunError(Exception):
    """A failure the user can act on: the commands report it as one line and exit with `exit_code`."""

    exit_code = 1


class ConfigError(DlrunError, ValueError):
    """Bad user input (a value, a path, a pairing that cannot work)."""


class RunFolderError(DlrunError):
    """A run folder that cannot be used as asked: another process owns it, it holds another run,
    or a checkpoint in it belongs to a different run."""


class NonFiniteLoss(DlrunError):
    """The training loss became NaN or infinite (trainer.on_nonfinite=stop)."""


class Interrupted(DlrunError):
    """SIGINT/SIGTERM stopped the run after a complete step (`checkpointed`: with a checkpoint of it)."""

    def __init__(self, signum: int, step: int, checkpointed: bool = True) -> None:
        written = "a checkpoint was written" if checkpointed else "no checkpoint was written (trainer.save_checkpoints=false)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {written}")
        self.signum, self.step, self.checkpointed = signum, step, checkpointed

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return signal_exit_code(self.signum)


class PeerLost(DlrunError):
    """Another process of the DDP group went away mid-run (killed, its node lost): this one cannot go on."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"another process of the group ended ({reason}): this one stops too; under torchrun "
                         "--max-restarts the group is started again and continues from the last checkpoint")


class WorkerFailed(DlrunError):
    """A DDP rank's process ended with a non-zero exit code (`traceback`: an unexpected error's)."""

    def __init__(self, rank: int, exit_code: int, traceback: str = "") -> None:
        super().__init__(f"rank {rank} exited with code {exit_code}")
        self.rank, self.worker_exit_code, self.traceback = rank, exit_code, traceback

    @property
    def signum(self) -> int | None:
        """The signal the rank stopped for, when its exit code says so (128 + signal)."""
        return self.worker_exit_code - 128 if self.worker_exit_code > 128 else None


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, wherever the run is (a KeyboardInterrupt, so that no
    `except Exception` catches it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum


def signal_exit_code(signum: int) -> int:
    """The shell's convention: a process ended by a signal exits with 128 + its number."""
    return 128 + signum


def exit_code(err: BaseException) -> int:
    """The exit status for an error that ends a dlrun command."""
    if isinstance(err, DlrunError):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return signal_exit_code(getattr(err, "signum", signal.SIGINT))
    return 1


def require_extra(extra: str, modules: tuple[str, ...], command: str) -> None:
    """A one-line error naming the extra to install when a module of it is missing (found without importing it)."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise DlrunError(f"{command} needs dlrun's {extra} extra ({', '.join(missing)} missing here): "
                         f"pip install 'dlrun[{extra}]'")
