"""The `dlrun-*` commands that work on finished run folders: report, predict, compress, explain, export. Each
parses its arguments before importing torch, so `--help` and argument errors answer at once."""

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """An argparse type: an integer of 1 or more (argparse reports anything else as its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), not {text!r}")
    return value


def run_checkpoint(run: Path, which: str, verb: str):
    """The run folder (which the tool writes into) and its best or last checkpoint; one-line errors when either is
    missing (`verb`: what the tool does with the checkpoint)."""
    from dlrun.errors import ConfigError
    from dlrun.rundir import RunDir, check_links

    if not run.is_dir():
        raise ConfigError(f"{run}: not a run folder (give the folder a dlrun run wrote)")
    folder = RunDir(run)
    check_links(folder)  # the tools write into it (plots/, explain.json, export/)
    path = folder.best if which == "best" else folder.last
    if not path.is_file():
        raise ConfigError(f"{run}: no checkpoint to {verb} ({path.relative_to(folder.path)} does not exist; "
                          "runs with trainer.save_checkpoints=false have none)")
    return folder, path
