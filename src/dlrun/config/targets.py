"""What a config's `_target_` may name when dlrun instantiates it. Torch-free."""

from __future__ import annotations

from typing import Any

# What a config's `_target_` may name (Hydra 1.4 asks every instantiate call for an execution
# whitelist): dlrun's and PyTorch's callables. A model's own target is allowed by name, since
# `model=custom model._target_=my_pkg.MyNet` exists to run the user's code.
TRUSTED_TARGETS = ("dlrun.*", "torch.*")


def instantiate_trusted(cfg: Any, *also: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` limited to TRUSTED_TARGETS and the targets in `also`."""
    from hydra.utils import instantiate

    return instantiate(cfg, _execution_whitelist_=[*TRUSTED_TARGETS, *also], **kwargs)
