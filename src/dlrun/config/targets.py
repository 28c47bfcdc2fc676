"""What a config's `_target_` may name when dlrun instantiates it. Torch-free.

A config the user composes on the command line is the user's own: it may name any callable of
dlrun's, PyTorch's, or (`model=custom`) the user's. A config read back from a checkpoint or a
run folder is not: `check_saved_config` lets it name only dlrun's own builders, or classes the
user names on the command line, and only plain values besides.
"""

from __future__ import annotations

from typing import Any, Iterable

from dlrun.errors import ConfigError

# What a config's `_target_` may name (Hydra 1.4 asks every instantiate call for an execution
# whitelist): dlrun's and PyTorch's callables. A model's own target is allowed by name, since
# `model=custom model._target_=my_pkg.MyNet` exists to run the user's code.
TRUSTED_TARGETS = ("dlrun.*", "torch.*")


def import_user_code() -> None:
    """Let `_target_`s name the user's own modules in the working directory, as `python -m` would;
    appended, so they never shadow installed packages."""
    import os
    import sys

    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def instantiate_trusted(cfg: Any, *also: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` limited to TRUSTED_TARGETS and the targets in `also`; a target that cannot be
    found or used (a module that does not exist, a name outside the whitelist) is a one-line ConfigError."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(cfg, _execution_whitelist_=[*TRUSTED_TARGETS, *also], **kwargs)
    except InstantiationException as err:
        target = cfg.get("_target_") if hasattr(cfg, "get") else None
        root = err
        while root.__cause__ is not None:  # Hydra wraps the import's own error, which says what is missing
            root = root.__cause__
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        cause = f" ({type(root).__name__}: {(str(root).strip().splitlines() or [''])[0]})" if root is not err else ""
        raise ConfigError(f"_target_={target} cannot be used: {first}{cause}; it must be importable from where "
                          "dlrun runs (or installed)") from None


# ------------------------------------------------------------ saved configs

BUILT_GROUPS = ("model", "optimizer", "scheduler", "dataset")  # the groups dlrun instantiates


def builders() -> frozenset[str]:
    """dlrun's own builders, by exact name: the `_target_` of every option of the schema."""
    from dataclasses import MISSING, fields

    from dlrun.config.schema import GROUPS

    return frozenset(f.default for options in GROUPS.values() for node in options.values() for f in fields(node)
                     if f.name == "_target_" and f.default is not MISSING)


def check_saved_config(config: Any, source: str, trust: Iterable[str] = (), consent: str = "--trust {target}") -> dict:
    """A config read from a checkpoint or a run folder, which someone else may have written: each
    built group may name only one of dlrun's own builders (exact names), or a callable the user
    trusts explicitly (`trust`: on the command line, e.g. a `model=custom` class; `consent`, formatted
    with the group and target, says how); every
    other value must be plain data (no `_target_` or other `_..._` key below a group's top, no
    `${...}` interpolation). Returns the config, or raises ConfigError naming the first problem."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source} holds no dlrun config (not written by dlrun?)")
    allowed = builders() | set(trust)
    for group in BUILT_GROUPS:
        node = config.get(group)
        target = node.get("_target_") if isinstance(node, dict) else None
        if not isinstance(target, str):
            raise ConfigError(f"{source} holds no dlrun config ({group}._target_ is missing; not written by dlrun?)")
        if target not in allowed:
            raise ConfigError(f"{source} names code outside dlrun's builders ({group}._target_={target}); load it "
                              f"only if you trust it, with {consent.format(group=group, target=target)}")
    for key, value in config.items():
        _check_plain(value, str(key), source, top=key in BUILT_GROUPS)
    return config


def _check_plain(value: Any, where: str, source: str, top: bool = False) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or (key.startswith("_") and not (top and key == "_target_")):
                raise ConfigError(f"{source}: {where}.{key} is not allowed in a saved config (plain values only)")
            _check_plain(item, f"{where}.{key}", source)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", source)
    elif isinstance(value, str):
        if "${" in value:
            raise ConfigError(f"{source}: {where}={value!r} is an interpolation; a saved config holds plain values")
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise ConfigError(f"{source}: {where} is a {type(value).__name__}; a saved config holds plain values")
