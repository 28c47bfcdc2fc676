"""The `dlrun-*` commands that work on finished run folders: report, predict, compress, explain. Each
parses its arguments before importing torch, so `--help` and argument errors answer at once."""

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer of 1 or more (argparse reports anything else as its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), not {text!r}")
    return value
