"""dlrun: a command-line experiment runner for deep learning."""

from dlrun.cpus import set_wait_policy

__version__ = "0.1.0"

# Before torch loads the OpenMP runtime: on a busy machine, waiting threads sleep rather than spin (cpus.py).
set_wait_policy()
