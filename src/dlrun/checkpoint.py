"""Checkpoints: plain dicts of tensors and Python values, written atomically, loaded safely;
`Checkpointer` owns a run's best.pt and last.pt; `load_model` is the one way from a run folder (or a
checkpoint file) to a model: dlrun-predict, dlrun-compress, dlrun-explain and distillation's teacher."""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dlrun.config.schema import with_current_keys
from dlrun.config.targets import check_saved_config
from dlrun.errors import ConfigError
from dlrun.models import build_model
from dlrun.rundir import RunDir, atomic_write
from dlrun.train import Parts, TrainState


def save(obj: dict[str, Any], path: Path) -> None:
    """torch.save through the run folder's atomic write: a crash leaves the old file or the new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`: a checkpoint can hold tensors and plain values, never code."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt, foreign or unsafe files
        # (torch's own text suggests loading without weights_only: never pass that on)
        raise ConfigError(f"checkpoint {path} cannot be loaded safely: it is not a dlrun checkpoint, or it is "
                          f"damaged ({type(err).__name__})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise ConfigError(f"checkpoint {path} is not a dlrun checkpoint (no 'model' entry)")
    return obj


def config_of(ckpt: dict[str, Any], path: Path, trust: Iterable[str] = (),
              consent: str = "--trust {target}") -> DictConfig:
    """The config a checkpoint was trained with, refused unless it names only dlrun's builders
    (or what the user trusts) and plain values: loading a checkpoint never runs its code. Settings
    added to dlrun since it was saved take today's values (config/schema.py with_current_keys)."""
    return with_current_keys(OmegaConf.create(check_saved_config(ckpt.get("config"), str(path), trust, consent)))


def load_weights(module: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """`module.load_state_dict(state)`, with a one-line error when the weights do not fit the module."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"checkpoint {path}: its weights do not fit the model its config describes ({first})") from None


DESCRIBED = ("input_shape", "num_outputs", "task", "name")  # what a checkpoint's data description must hold


def load_model(path: Path, trust: Iterable[str] = (), consent: str = "--trust {target}",
               prepare: Callable[[torch.nn.Module, dict[str, Any]], torch.nn.Module] | None = None,
               ) -> tuple[torch.nn.Module, DictConfig, dict[str, Any]]:
    """The model of a run folder (its best checkpoint) or of a checkpoint file, on the CPU in eval mode,
    with the checkpoint's config (checked: it names only dlrun's builders or what is in `trust`; `consent`
    says how to trust more) and its data description. The model is built from the description's shapes,
    made ready by `prepare(model, checkpoint)` (dlrun-compress's int8 and half variants), then given the
    weights; building it leaves the caller's RNG as it was (a distilled student's initial weights must
    not depend on its teacher)."""
    path = Path(path)
    path = RunDir(path).best if path.is_dir() else path
    ckpt = load(path)
    config = config_of(ckpt, path, trust, consent)
    data = ckpt.get("data")
    if not isinstance(data, dict) or not set(DESCRIBED) <= set(data):
        raise ConfigError(f"{path}: the checkpoint has no data description (written by an older dlrun)")
    with torch.random.fork_rng(devices=[]):
        model = build_model(config.model, data["input_shape"], data["num_outputs"], pretrained=False)
    model = prepare(model, ckpt) if prepare is not None else model
    load_weights(model, ckpt["model"], path)
    return model.eval(), config, data


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (Python, numpy, torch CPU and CUDA), as checkpoint-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_checkpoint(parts: Parts, state: TrainState, **extra: Any) -> dict[str, Any]:
    """Everything needed to continue a run exactly (`extra`: the config, versions, ...)."""
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": None if parts.scheduler is None else parts.scheduler.state_dict(),
        "scaler": None if parts.scaler is None else parts.scaler.state_dict(),
        "ema": None if parts.ema is None else parts.ema.state_dict(),
        "swa": None if parts.swa is None else parts.swa.state_dict(),
        "state": dataclasses.asdict(state),
        "rng": rng_state(),
        **extra,
    }


def restore_training(ckpt: dict[str, Any], parts: Parts, path: Path = Path("the checkpoint")) -> TrainState:
    """Load a `training_checkpoint` into freshly built parts; the RNGs continue where they were."""
    load_weights(parts.model, ckpt["model"], path)
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    for name in ("scheduler", "scaler", "ema", "swa"):
        obj = getattr(parts, name)
        if obj is not None:
            obj.load_state_dict(ckpt[name])
    set_rng_state(ckpt["rng"])
    return TrainState(**ckpt["state"])


class Checkpointer:
    """Owns a run's checkpoints (written by rank 0 only) and the best epoch's weights in memory.

    An improving epoch writes best.pt before last.pt. Killed between the two, the run resumes
    from the previous last.pt, which does not know of the new best yet, and replaying the epoch
    rewrites best.pt with the same weights: every kill point resumes to the uninterrupted result.
    (Written the other way round, last.pt would name an epoch as best whose weights never
    reached best.pt.) The top-k files (trainer.save_top_k) follow the same rule: an epoch's file
    is written before last.pt names it, and a file is removed only after last.pt no longer does.
    """

    def __init__(self, run_dir: RunDir, parts: Parts, extra: dict[str, Any], write: bool = True,
                 main: bool = True) -> None:
        self.run_dir, self.parts, self.extra = run_dir, parts, extra  # extra: config, data, run id, version
        self.write, self.main = write, main
        self.best_weights = self.weights()

    def weights(self) -> dict[str, Any]:
        """A copy of the model's (and EMA's) weights as they are now."""
        ema = self.parts.ema
        return copy.deepcopy({"model": self.parts.model.state_dict(), "ema": None if ema is None else ema.state_dict()})

    def restore(self, resumed: dict[str, Any]) -> TrainState:
        """Continue from a loaded last.pt: parts, RNGs and the best weights so far (both checkpoints were
        checked to be the run's own before anything was written: resume.open_checkpoint)."""
        state = restore_training(resumed, self.parts, self.run_dir.last)
        if self.run_dir.best.is_file():
            self.best_weights = load(self.run_dir.best)
        return state

    def save(self, state: TrainState, is_best: bool) -> None:
        """`fit`'s save point: remember the best weights; write best.pt (if improved), then last.pt."""
        if not self.main:
            return
        if is_best:
            self.best_weights = self.weights()
        if not self.write:
            return
        kept = {int(epoch) for _, epoch in state.top_k}  # trainer.save_top_k > 1
        if state.batch == 0 and state.epoch in kept:  # at an epoch's end (or a stop before its first step)
            self.save_weights(self.weights(), state.epoch, state.last_metrics, self.run_dir.top_epoch(state.epoch))
        if is_best:
            self.save_weights(self.best_weights, state.best_epoch, state.best_metrics, self.run_dir.best)
        save(training_checkpoint(self.parts, state, **self.extra), self.run_dir.last)
        for epoch, path in self.run_dir.top_files().items() if kept else ():
            if epoch not in kept:  # removed after last.pt, which no longer names it
                path.unlink()

    def save_weights(self, weights: dict[str, Any], epoch: int | None, metrics: dict[str, float], path: Path) -> None:
        """A checkpoint of weights alone, as best.pt is (load_model reads any of them)."""
        save({**weights, "epoch": epoch, "metrics": metrics, **self.extra}, path)

    def has_last(self) -> bool:
        """Whether the run folder holds a last checkpoint to continue from."""
        return self.run_dir.last.is_file()

    def describe_last(self) -> str:
        """What a run that fails can continue from, for its error message."""
        if not self.has_last():
            return "no checkpoint had been written yet"
        state = torch.load(self.run_dir.last, weights_only=True)["state"]
        return f"the last good checkpoint is kept (epoch {state['epoch']}, step {state['step']})"

    def load_best(self) -> None:
        """Put the best epoch's weights into the model (and EMA)."""
        self.parts.model.load_state_dict(self.best_weights["model"])
        if self.parts.ema is not None:
            self.parts.ema.load_state_dict(self.best_weights["ema"])
