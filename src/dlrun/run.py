"""`run(cfg) -> dict`: wires the pieces together. The CLI, tests and sweepers call this."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import dlrun
from dlrun import checkpoint
from dlrun.config import monitor_mode, to_plain, validate
from dlrun.data import build_data, num_batches
from dlrun.device import resolve_device, seed_everything
from dlrun.models import build_model, count_parameters
from dlrun.optim import build_optimizer, build_scheduler
from dlrun.sinks import ConsoleSink, JsonlSink, LogSink
from dlrun.train import FitConfig, TrainState, evaluate, fit


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the summary written to summary.json.

    `run_dir` defaults to Hydra's output directory for this job.
    """
    validate(cfg)
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.trainer
    mode = monitor_mode(t)
    clock = time.perf_counter()
    summary: dict[str, Any] = {
        "status": "running",
        "run_dir": str(run_dir.resolve()),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **hydra_job_info(),
        "monitor": {"metric": t.monitor, "mode": mode},
        "versions": {
            "dlrun": dlrun.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "git_sha": git_sha(),
    }
    write_json(run_dir / "summary.json", summary)
    sinks = [ConsoleSink(), JsonlSink(run_dir / "metrics.jsonl"), LogSink()]
    try:
        device = resolve_device(cfg.device)
        seed_everything(t.seed)
        data = build_data(instantiate(cfg.dataset), device)
        model = build_model(cfg.model, data.spec).to(device)
        optimizer = build_optimizer(cfg.optimizer, model)
        steps_per_epoch = num_batches(data.sizes()["train"], t.batch_size)
        scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch, t.epochs * steps_per_epoch, mode)
        summary.update(
            device=device_name(device),
            data={"name": data.spec.name, "sizes": data.sizes(), "input_shape": list(data.spec.input_shape),
                  "num_classes": data.spec.num_outputs, "mean": data.mean, "std": data.std},
            model={"class": type(model).__name__, "parameters": count_parameters(model)},
        )
        write_json(run_dir / "summary.json", summary)
        plain_cfg = to_plain(cfg)

        def save_checkpoints(state: TrainState, is_best: bool) -> None:
            if not t.save_checkpoints:
                return
            common = {"epoch": state.epoch, "step": state.step, "best_value": state.best_value,
                      "best_epoch": state.best_epoch, "config": plain_cfg, "dlrun_version": dlrun.__version__}
            checkpoint.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": None if scheduler is None else scheduler.state_dict(), **common},
                run_dir / "checkpoints" / "last.pt",
            )
            if is_best:
                checkpoint.save({"model": model.state_dict(), **common}, run_dir / "checkpoints" / "best.pt")

        fit_cfg = FitConfig(
            epochs=t.epochs, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, seed=t.seed,
            eval_every=t.eval_every, log_every=t.log_every, monitor=t.monitor, mode=mode,
        )
        train_started = time.perf_counter()
        state, history, best_weights = fit(model, data, optimizer, scheduler, fit_cfg, sinks, save_checkpoints)
        train_seconds = time.perf_counter() - train_started

        # Final = the weights after the last epoch; best = at the best monitored value.
        final = {k: v for k, v in history[-1].items() if "/" in k}
        final.update(prefixed("test", evaluate(model, *data.splits["test"], t.eval_batch_size)))
        best_record = history[state.best_epoch - 1]
        best = {"epoch": state.best_epoch, **{k: v for k, v in best_record.items() if "/" in k}}
        model.load_state_dict(best_weights)
        best.update(prefixed("test", evaluate(model, *data.splits["test"], t.eval_batch_size)))

        samples = data.sizes()["train"] * t.epochs
        summary.update(
            status="completed",
            epochs=state.epoch,
            steps=state.step,
            final=final,
            best=best,
            monitor_value=state.best_value,
            train={"seconds": train_seconds, "samples_per_s": samples / train_seconds},
            wall_time_s=time.perf_counter() - clock,
        )
    except BaseException as err:
        summary.update(
            status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
            error=f"{type(err).__name__}: {err}",
            wall_time_s=time.perf_counter() - clock,
        )
        write_json(run_dir / "summary.json", summary)
        for sink in sinks:
            sink.close(None)
        raise
    write_json(run_dir / "summary.json", summary)
    for sink in sinks:
        sink.close(summary)
    return summary


def prefixed(split: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{split}/{k}": v for k, v in metrics.items()}


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def hydra_job_info() -> dict[str, Any]:
    """The command-line overrides and chosen group options, when running under Hydra."""
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith(("hydra", "schema"))}
    return {"overrides": list(hc.overrides.task), "choices": choices}


def git_sha() -> str | None:
    """The commit of the working directory's repository, if it is one (for reproducibility)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
