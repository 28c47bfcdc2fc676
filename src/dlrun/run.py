"""`run(cfg) -> dict`: wires the pieces together. The CLI, tests and sweepers call this."""

from __future__ import annotations

import copy
import json
import logging
import platform
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dlrun
from dlrun import checkpoint, distributed
from dlrun.config import (
    ClipMode,
    ConfigError,
    DlrunError,
    OnNonFinite,
    check_data_parallel,
    check_search_direction,
    instantiate_trusted,
    resolve_monitor,
    resume_checkpoint,
    to_plain,
    validate,
)
from dlrun.cost import model_cost, peak_memory_mb
from dlrun.data import build_data, channels_last, quick_check_subsets
from dlrun.device import amp_dtype, deterministic_algorithms, resolve_device, seed_everything
from dlrun.distributed import SINGLE, Group
from dlrun.models import build_model, count_parameters
from dlrun.optim import build_optimizer, build_scheduler
from dlrun.report import learning_curves
from dlrun.sinks import ConsoleSink, JsonlSink, LogSink, MLflowSink, Sink, TensorBoardSink, flatten
from dlrun.train import (
    FitConfig,
    Interrupted,
    Parts,
    StopFlag,
    TrainState,
    evaluate_split,
    fit,
    steps_per_epoch,
)

log = logging.getLogger("dlrun")


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the summary written to summary.json.

    `run_dir` defaults to Hydra's output directory for this job. With `cfg.resume`
    set, the run continues in that folder from its checkpoints/last.pt, with the
    config saved there. With `trainer.devices=N` it spawns N DDP processes, and
    under torchrun this process is rank 0 (see distributed.py); either way the
    config and the run folder are decided here, once.
    """
    resumed: dict[str, Any] | None = None
    if cfg.get("resume"):
        run_dir, resumed = open_resume(cfg.resume)
        cfg = OmegaConf.create(resumed["config"])
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    ranks = distributed.torchrun_env()
    if ranks is not None:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise ConfigError("under torchrun dlrun runs one job; sweep with trainer.devices=N instead")
        with distributed.process_group(ranks):
            ranks.share({"config": to_plain(cfg), "run_dir": str(run_dir), "resumed": resumed is not None})
            return train(cfg, run_dir, resumed, ranks)
    if cfg.trainer.devices > 1:
        return spawn_ranks(cfg, run_dir, resumed)
    return train(cfg, run_dir, resumed)


def train(cfg: DictConfig, run_dir: Path, resumed: dict[str, Any] | None, ranks: Group = SINGLE,
          job_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run itself, in this process: rank `ranks.rank` of a DDP run, or the only process.

    Only rank 0 writes (summary, metrics, checkpoints, display) and returns the summary;
    the other ranks return an empty dict.
    """
    clock = time.perf_counter()
    main = ranks.is_main
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = start_summary(cfg, run_dir, resumed, job_info) if main else {}
    jsonl = JsonlSink(run_dir / "metrics.jsonl") if main else None
    sinks: list[Sink] = [ConsoleSink(), jsonl, LogSink()] if main else []
    if main:
        write_json(run_dir / "summary.json", summary)
    try:
        with stop_on_signals() as stop, ExitStack() as scope:
            validate(cfg)
            t = cfg.trainer
            if main:
                sinks += optional_sinks(cfg, run_dir)
            device = resolve_device(cfg.device)
            if ranks.world > 1:
                device = distributed.rank_device(device, ranks, cfg.device.threads)
            scope.enter_context(deterministic_algorithms(t.deterministic))
            seed_everything(t.seed)
            data = build_data(instantiate_trusted(cfg.dataset), device)
            data = quick_check_subsets(data, t.overfit_batches * t.batch_size, t.limit_eval_batches * t.eval_batch_size)
            if ranks.world > 1:
                check_data_parallel(t, ranks.world, len(data.splits["train"]))
            fit_cfg = fit_config(t, data.spec.task)
            if HydraConfig.initialized() and "direction" in HydraConfig.get().sweeper:  # an Optuna sweep
                check_search_direction(HydraConfig.get().sweeper.direction, fit_cfg.monitor, fit_cfg.mode)
            model = build_model(cfg.model, data.spec).to(device)
            if t.channels_last:
                model, data = model.to(memory_format=torch.channels_last), channels_last(data)
            optimizer = build_optimizer(cfg.optimizer, model, t.decay_norm_and_bias)
            steps = steps_per_epoch(len(data.splits["train"]), fit_cfg)
            parts = Parts(
                model,
                optimizer,
                build_scheduler(cfg.scheduler, optimizer, steps, t.epochs * steps, fit_cfg.mode),
                compiled=torch.compile(model) if t.compile else None,
                scaler=torch.amp.GradScaler(device.type) if fit_cfg.amp_dtype is torch.float16 else None,
                ema=AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
                if t.ema_decay > 0 else None,
            )
            if ranks.world > 1:
                parts.ddp = distributed.wrap(parts.net, device)
            summary.update(
                device=device_name(device),
                threads=torch.get_num_threads(),
                monitor={"metric": fit_cfg.monitor, "mode": fit_cfg.mode},
                data={**data.describe(), "sizes": data.sizes()},
                model={"class": type(model).__name__, "parameters": count_parameters(model)},
                processes=ranks.world,
            )
            if main:
                write_json(run_dir / "summary.json", summary)

            def weights() -> dict[str, Any]:
                return copy.deepcopy({"model": model.state_dict(),
                                      "ema": None if parts.ema is None else parts.ema.state_dict()})

            state, best_weights = TrainState(), weights()
            if resumed is not None:
                state = checkpoint.restore_training(resumed, parts)
                best_path = run_dir / "checkpoints" / "best.pt"
                best_weights = checkpoint.load(best_path) if best_path.is_file() else best_weights
            if main:  # a new run in a folder used before starts a new record; a resumed one drops
                jsonl.keep_epochs(state.epoch)  # the records written after its checkpoint
            plain_cfg = to_plain(cfg)

            def save(state: TrainState, is_best: bool) -> None:
                nonlocal best_weights
                if not main:
                    return
                if is_best:
                    best_weights = weights()
                if not t.save_checkpoints:
                    return
                extra = {"config": plain_cfg, "data": data.describe(), "dlrun_version": dlrun.__version__}
                checkpoint.save(checkpoint.training_checkpoint(parts, state, **extra), run_dir / "checkpoints" / "last.pt")
                if is_best:
                    checkpoint.save({**best_weights, "epoch": state.best_epoch, "metrics": state.best_metrics, **extra},
                                    run_dir / "checkpoints" / "best.pt")

            train_started = time.perf_counter()
            first_step = state.step
            state = fit(parts, data, fit_cfg, sinks, save, state, stop, ranks)
            train_seconds = time.perf_counter() - train_started
            if not main:
                return {}

            # Final = the weights after the last epoch; best = at the best monitored value.
            final = {**state.last_metrics, **evaluate_split(parts, "test", data.splits["test"], fit_cfg)}
            model.load_state_dict(best_weights["model"])
            if parts.ema is not None:
                parts.ema.load_state_dict(best_weights["ema"])
            best = {"epoch": state.best_epoch, **state.best_metrics,
                    **evaluate_split(parts, "test", data.splits["test"], fit_cfg)}
            cost = model_cost(model, data.spec.input_shape, t.batch_size, device)
        samples = (state.step - first_step) / steps * data.sizes()["train"]
        peak, memory_kind = peak_memory_mb(device)
        summary.update(
            status="completed",
            epochs=state.epoch,
            steps=state.step,
            stopped_early=state.stopped_early,
            final=final,
            best=best,
            monitor_value=state.best_value,
            train={"seconds": train_seconds, "samples_per_s": samples / train_seconds if train_seconds else 0.0},
            cost={**cost, "peak_memory_mb": peak, "memory": memory_kind},
            wall_time_s=time.perf_counter() - clock,
        )
    except BaseException as err:
        if not main:
            raise
        # SystemExit: a launcher (submitit) ends the job to requeue it
        interrupted = isinstance(err, (KeyboardInterrupt, Interrupted, SystemExit))
        summary.update(
            status="interrupted" if interrupted else "failed",
            error=f"{type(err).__name__}: {err}",
            wall_time_s=time.perf_counter() - clock,
        )
        if isinstance(err, Interrupted):
            summary["steps"] = err.step
        write_json(run_dir / "summary.json", summary)
        for sink in sinks:
            sink.close(None)
        raise
    write_json(run_dir / "summary.json", summary)
    learning_curves(run_dir)
    for sink in sinks:
        sink.close(summary)
    return summary


def spawn_ranks(cfg: DictConfig, run_dir: Path, resumed: dict[str, Any] | None) -> dict[str, Any]:
    """`trainer.devices=N`: train in N new DDP processes on this machine; their rank 0 writes the
    run folder, and its summary is returned (or its error raised) here."""
    job = {"config": to_plain(cfg), "run_dir": str(run_dir), "resumed": resumed is not None, "hydra": hydra_job_info()}
    try:
        validate(cfg)  # bad input fails before any process starts
        distributed.spawn(rank_main, cfg.trainer.devices, job)
    except DlrunError as err:  # raised here, before any rank started: recorded as a rank 0 would
        summary = {**start_summary(cfg, run_dir, resumed), "status": "failed", "error": f"{type(err).__name__}: {err}"}
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "summary.json", summary)
        raise
    except distributed.WorkerFailed as err:
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        if summary.get("status") == "completed" and not err.traceback:  # the run ended; a rank then died
            log.warning("%s after the run had completed; its results are kept", err)  # in gloo's teardown
            return summary
        if summary.get("status") == "interrupted":  # after a checkpoint (128 + signal), or a second Ctrl-C
            raise (Interrupted(err.exit_code - 128, summary.get("steps", 0)) if err.exit_code > 128
                   else KeyboardInterrupt) from None
        if err.traceback:  # not an error dlrun names: show where it happened, as one process would
            raise RuntimeError(f"rank {err.rank} of the {cfg.trainer.devices}-process run failed:{err.traceback}") from None
        raise DlrunError(f"the {cfg.trainer.devices}-process run failed: {summary.get('error') or err}") from None
    return json.loads((run_dir / "summary.json").read_text())


def rank_main(ranks: Group, job: dict[str, Any] | None = None) -> None:
    """A DDP rank in its own process: spawned by `spawn_ranks` with the job, or started by torchrun
    (ranks other than 0), which receive the job from rank 0. Errors that rank 0 records in the
    summary end the process with an exit code (128 + signal when interrupted)."""
    try:
        with distributed.process_group(ranks):
            job = job or ranks.share(None)
            run_dir = Path(job["run_dir"])
            rank_logging(ranks, run_dir / "dlrun.log")
            resumed = checkpoint.load(run_dir / "checkpoints" / "last.pt") if job["resumed"] else None
            train(OmegaConf.create(job["config"]), run_dir, resumed, ranks, job.get("hydra"))
    except DlrunError as err:
        raise SystemExit(128 + err.signum if isinstance(err, Interrupted) else 1) from None


def rank_logging(ranks: Group, path: Path) -> None:
    """Logging in a rank's own process (Hydra configured the launching process only): rank 0 logs
    as a Hydra job does, to the run's log with warnings also on the console; the others stay quiet."""
    root = logging.getLogger()
    if not ranks.is_main:
        root.addHandler(logging.NullHandler())
        return
    form = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    file, console = logging.FileHandler(path), logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    for handler in (file, console):
        handler.setFormatter(form)
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def optional_sinks(cfg: DictConfig, run_dir: Path) -> list[Sink]:
    """TensorBoard and MLflow, as `cfg.logger` asks (a config saved before they existed: TensorBoard only)."""
    logger = cfg.get("logger") or {"tensorboard": True, "mlflow": False}
    sinks: list[Sink] = []
    if logger["tensorboard"]:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if logger["mlflow"]:
        params = {k: v for k, v in flatten(to_plain(cfg)).items() if not k.startswith(("logger", "resume"))}
        sinks.append(MLflowSink(logger["mlflow_tracking_uri"], logger["mlflow_experiment"], run_dir.name, params, run_dir))
    return sinks


def fit_config(t: DictConfig, task: str) -> FitConfig:
    """The loop's settings from cfg.trainer, for a classification or regression task."""
    monitor, mode = resolve_monitor(t, task)
    return FitConfig(
        epochs=t.epochs, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, seed=t.seed,
        eval_every=t.eval_every, log_every=t.log_every, monitor=monitor, mode=mode, task=task,
        checkpoint_every=t.checkpoint_every, skip_nonfinite=OnNonFinite(t.on_nonfinite) is OnNonFinite.skip,
        amp_dtype=amp_dtype(t.precision), grad_clip=t.grad_clip,
        clip_by_value=ClipMode(t.grad_clip_mode) is ClipMode.value, accumulate=t.accumulate,
        label_smoothing=t.label_smoothing, warmup_epochs=t.warmup_epochs, patience=t.early_stopping.patience,
        min_delta=t.early_stopping.min_delta, limit_train_batches=t.limit_train_batches,
    )


def open_resume(folder: str) -> tuple[Path, dict[str, Any]]:
    """The run folder to continue and its last checkpoint. Besides `resume=`, only the run's own
    overrides may be given (a requeued sweep job repeats them, see launchers.py)."""
    last = resume_checkpoint(folder)
    if HydraConfig.initialized():
        saved = last.parents[1] / ".hydra" / "overrides.yaml"
        own = set(OmegaConf.load(saved)) if saved.is_file() else set()
        others = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=") and o not in own]
        if others:
            raise ConfigError(
                f"resume={folder} continues the run with the config saved in its checkpoint; "
                f"drop the other overrides ({' '.join(others)})"
            )
    return last.parents[1], checkpoint.load(last)


def start_summary(cfg: DictConfig, run_dir: Path, resumed: dict[str, Any] | None,
                  job_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary as the run starts: status `running`; a resumed run keeps its earlier entries.
    `job_info`: the Hydra job's overrides and choices (default: this process's Hydra job, if any)."""
    path = run_dir / "summary.json"
    if resumed is not None and path.is_file():
        summary = json.loads(path.read_text())
        for stale in ("error", "final", "best", "monitor_value", "train", "steps"):
            summary.pop(stale, None)
        state = resumed["state"]
        summary.setdefault("resumed", []).append(
            {"at": now(), "epoch": state["epoch"], "batch": state["batch"], "step": state["step"]}
        )
        summary["status"] = "running"
        return summary
    return {
        "status": "running",
        "run_dir": str(run_dir.resolve()),
        "started_at": now(),
        **(hydra_job_info() if job_info is None else job_info),
        "versions": {"dlrun": dlrun.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "git_sha": git_sha(),
    }


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, checkpoints and stops. A second signal stops at once."""
    stop = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum
        log.warning("%s received: finishing the current step and writing a checkpoint", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
