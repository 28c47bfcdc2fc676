"""`run(cfg) -> dict`: wires the pieces together. The CLI, tests and sweepers call this.

`run` decides the config and the run folder once and takes ownership of the folder; `run_here`
is the run itself, as a short list of named steps.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dlrun
from dlrun import baselines, charts, checkpoint, distributed, rundir
from dlrun.checkpoint import Checkpointer
from dlrun.compress.distill import load_teacher
from dlrun.config.schema import TrainerConfig, to_plain, trainer_config
from dlrun.config.validate import check_data_parallel, check_search_direction, validate
from dlrun.cost import model_cost, peak_memory_mb
from dlrun.data import Data, build_dataset, channels_last, quick_check_subsets
from dlrun.device import deterministic_algorithms, resolve_device, seed_everything, use_channels_last
from dlrun.distributed import SINGLE, Ranks
from dlrun.errors import ConfigError, DlrunError, Interrupted, NonFiniteLoss, StopNow, WorkerFailed
from dlrun.metrics import TestAnalysis, analysis_for
from dlrun.models import build_model, count_parameters
from dlrun.optim import build_optimizer, build_scheduler
from dlrun.rundir import RunDir, RunRecord
from dlrun.sinks import ConsoleSink, JsonlSink, LogSink, MLflowSink, Sink, TensorBoardSink, flatten
from dlrun.train import LoopSettings, Parts, StopFlag, TrainState, evaluate, evaluate_split, fit, steps_per_epoch

log = logging.getLogger("dlrun")


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the summary written to the run folder.

    `run_dir` defaults to Hydra's output directory for this job. With `cfg.resume` set, the
    run continues in that folder from its last checkpoint, with the config saved there. With
    `trainer.devices=N` it spawns N DDP processes, and under torchrun this process is rank 0
    (see distributed.py); either way the config and the run folder are decided here, once,
    and this process owns the folder until the run ends.
    """
    resume = cfg.get("resume")
    folder = RunDir(Path(resume).expanduser().resolve() if resume
                    else Path(run_dir or HydraConfig.get().runtime.output_dir))
    with rundir.own(folder):
        resumed = open_resume(resume, folder) if resume else None
        if resumed is not None:
            cfg = resumed_config(resumed, folder, resume, cfg)
        else:
            rundir.check_fresh(folder)
        ranks = distributed.torchrun_env()
        if ranks is not None:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise ConfigError("under torchrun dlrun runs one job; sweep with trainer.devices=N instead")
            with distributed.process_group(ranks):
                ranks.share({"config": to_plain(cfg), "run_dir": str(folder.path), "resumed": resumed is not None})
                return run_here(cfg, folder, resumed, ranks)
        if cfg.trainer.devices > 1:
            return spawn_ranks(cfg, folder, resumed)
        return run_here(cfg, folder, resumed)


def run_here(cfg: DictConfig, folder: RunDir, resumed: dict[str, Any] | None, ranks: Ranks = SINGLE,
          job_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run itself, in this process: rank `ranks.rank` of a DDP run, or the only process.

    Only rank 0 writes (summary, metrics, checkpoints, display) and returns the summary;
    the other ranks return an empty dict.
    """
    clock, main = time.perf_counter(), ranks.is_main
    entries = run_entries(job_info)
    record = RunRecord(folder, entries, resume_point(resumed), run_id=resumed and resumed.get("run_id"), write=main)
    jsonl = JsonlSink(folder)
    sinks: list[Sink] = [ConsoleSink(entries.get("job")), jsonl, LogSink()] if main else []
    try:
        with stop_on_signals() as stop, ExitStack() as scope:
            validate(cfg)
            trainer = trainer_config(cfg.trainer)
            sinks += optional_sinks(cfg, folder, record) if main else []
            device = rank_device(cfg, ranks)
            scope.enter_context(deterministic_algorithms(trainer.deterministic))
            seed_everything(trainer.seed)
            data = load_data(cfg, trainer, device, ranks)
            settings = LoopSettings.of(trainer, data.spec.task)
            check_sweep_direction(settings)
            parts, data = build_parts(cfg, settings, data, device, ranks)
            record.update(**describe(parts, data, settings, device, ranks))
            checkpointer = Checkpointer(folder, parts, {"config": to_plain(cfg), "data": data.describe(),
                                                        "dlrun_version": dlrun.__version__, "run_id": record.run_id},
                                        write=settings.save_checkpoints, main=main)
            state = checkpointer.restore(resumed) if resumed is not None else TrainState()
            if main:  # a resumed run drops the records written after its checkpoint
                jsonl.keep_epochs(state.epoch)
            started, first_step = time.perf_counter(), state.step
            state = fit_telling_checkpoints(parts, data, settings, sinks, checkpointer, state, stop, ranks)
            trained_at = time.perf_counter()
            trained = (trained_at - started, state.step - first_step)
            results = final_results(parts, checkpointer, data, settings, state, device, *trained) if main else {}
            if stop.signum:  # during the final evaluation: the run is checkpointed, its results are not
                raise Interrupted(stop.signum, state.step, checkpointer.has_last())
            if main:
                charts.run_curves(folder, {**record.summary, **results})
    except BaseException as err:
        record.fail(err, wall_time_s=time.perf_counter() - clock)
        for sink in sinks:
            sink.close(None)
        raise
    # after_training_s: the post-training phase (test evaluation and analysis, cost, plots; bench/post_training.py)
    ended = time.perf_counter()
    record.update(status="completed", **results, after_training_s=ended - trained_at, wall_time_s=ended - clock)
    for sink in sinks:
        sink.close(record.summary)
    return record.summary


def fit_telling_checkpoints(parts: Parts, data: Data, settings: LoopSettings, sinks: list[Sink],
                            checkpointer: Checkpointer, state: TrainState, stop: StopFlag, ranks: Ranks) -> TrainState:
    """`fit`, whose stops say truly whether a checkpoint to continue from exists."""
    try:
        return fit(parts, data, settings, sinks, checkpointer.save, state, stop, ranks)
    except Interrupted as err:
        raise Interrupted(err.signum, err.step, checkpointer.has_last()) from None
    except NonFiniteLoss as err:
        raise NonFiniteLoss(f"{err}; {checkpointer.describe_last()}") from None


def rank_device(cfg: DictConfig, ranks: Ranks) -> torch.device:
    """The device this process trains on (a rank's own GPU or its share of the CPU under DDP)."""
    device = resolve_device(cfg.device)
    return distributed.rank_device(device, ranks, cfg.device.threads) if ranks.world > 1 else device


def load_data(cfg: DictConfig, trainer: TrainerConfig, device: torch.device, ranks: Ranks) -> Data:
    """The dataset on the device, cut to the quick-check subsets if asked, checked for DDP."""
    data = build_dataset(cfg.dataset, device)
    data = quick_check_subsets(data, trainer.overfit_batches * trainer.batch_size,
                               trainer.limit_eval_batches * trainer.eval_batch_size)
    if ranks.world > 1:
        check_data_parallel(trainer, ranks.world, len(data.splits["train"]))
    return data


def check_sweep_direction(settings: LoopSettings) -> None:
    """In an Optuna sweep, the study must rank trials as the run ranks its epochs."""
    if HydraConfig.initialized() and "direction" in HydraConfig.get().sweeper:
        check_search_direction(HydraConfig.get().sweeper.direction, settings.monitor, settings.mode)


def build_parts(cfg: DictConfig, settings: LoopSettings, data: Data, device: torch.device,
                ranks: Ranks) -> tuple[Parts, Data]:
    """Model, optimizer, scheduler and the optional compiled module, GradScaler, EMA and DDP
    wrapper; with `channels_last`, the data is converted to match."""
    model = build_model(cfg.model, data.spec).to(device)
    if use_channels_last(settings.channels_last, model, data.spec.input_shape, device, settings.amp_dtype):
        model, data = model.to(memory_format=torch.channels_last), channels_last(data)
    optimizer = build_optimizer(cfg.optimizer, model, settings.decay_norm_and_bias)
    steps = steps_per_epoch(len(data.splits["train"]), settings)
    parts = Parts(
        model,
        optimizer,
        build_scheduler(cfg.scheduler, optimizer, steps, settings.epochs * steps, settings.mode),
        compiled=torch.compile(model) if settings.compile else None,
        scaler=torch.amp.GradScaler(device.type) if settings.amp_dtype is torch.float16 else None,
        ema=AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
        if settings.ema_decay > 0 else None,
    )
    if settings.distill.teacher is not None:  # reloaded on resume too: it is part of the loss
        parts.teacher = load_teacher(settings.distill.teacher, data.describe(), device, tuple(trusted_targets()))
    if ranks.world > 1:
        parts.ddp = distributed.wrap(parts.eval_module, device)
    return parts, data


def describe(parts: Parts, data: Data, settings: LoopSettings, device: torch.device, ranks: Ranks) -> dict[str, Any]:
    """What the summary says about the run before it trains."""
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),  # see cpus.py
        "channels_last": use_channels_last(settings.channels_last, parts.model, data.spec.input_shape, device,
                                           settings.amp_dtype),
        "monitor": {"metric": settings.monitor, "mode": settings.mode},
        "data": {**data.describe(), "sizes": data.sizes()},
        "model": {"class": type(parts.model).__name__, "parameters": count_parameters(parts.model)},
        "processes": ranks.world,
        **({"teacher": teacher_record(parts, data, settings)} if parts.teacher is not None and ranks.is_main else {}),
    }


def teacher_record(parts: Parts, data: Data, settings: LoopSettings) -> dict[str, Any]:
    """A distilled run's teacher: its folder, size and score on the test split (evaluated once)."""
    scores = evaluate(parts.teacher, data.splits["test"], settings.eval_batch_size, settings.amp_dtype, settings.task)
    return {"run_dir": str(Path(settings.distill.teacher).expanduser().resolve()),
            "parameters": count_parameters(parts.teacher)["total"], "temperature": settings.distill.temperature,
            "alpha": settings.distill.alpha, **{f"test/{k}": v for k, v in scores.items()}}


def final_results(parts: Parts, checkpointer: Checkpointer, data: Data, settings: LoopSettings, state: TrainState,
                  device: torch.device, seconds: float, steps: int) -> dict[str, Any]:
    """The test split under the final weights (after the last epoch) and the best ones (at the
    best monitored value), the training speed, and what the model costs."""
    test = data.splits["test"]
    analyses = {w: analysis_for(data.spec.task, data.spec.num_outputs, data.classes, device) for w in ("final", "best")}
    final_test = evaluate_split(parts, "test", test, settings, analyses["final"].update)
    final = {**state.last_metrics, **final_test}
    if state.best_epoch == state.epoch:  # the best weights are the final ones: one test evaluation
        analyses["best"] = analyses["final"]
        best_test = final_test
    else:
        checkpointer.load_best()
        best_test = evaluate_split(parts, "test", test, settings, analyses["best"].update)
    best = {"epoch": state.best_epoch, **state.best_metrics, **best_test}
    analysed = analyse_test(analyses, {"final": final, "best": best}, checkpointer.run_dir, data.spec.task)
    cost = model_cost(parts.model, data.spec.input_shape, settings.batch_size, device, seconds)
    samples = steps / steps_per_epoch(len(data.splits["train"]), settings) * data.sizes()["train"]
    peak, memory_kind = peak_memory_mb(device)
    return {
        "epochs": state.epoch,
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "final": final,
        "best": best,
        "monitor_value": state.best_value,
        "train": {"seconds": seconds, "samples_per_s": samples / seconds if seconds else 0.0},
        "cost": {**cost, "peak_memory_mb": peak, "memory": memory_kind},
        **regression_baselines(data, best, final),
        **analysed,
    }


def analyse_test(analyses: dict[str, TestAnalysis], results: dict[str, dict[str, Any]], folder: RunDir,
                 task: str) -> dict[str, Any]:
    """What the final and best weights get right and wrong on the test split (see metrics.py): the
    scalars join their test results (`test/macro_f1`, `test/weighted_f1`, `test/top5_acc`; regression
    `test/rmse`), the details make the summary's `classes` (`outputs`) section, and the best weights
    are drawn: plots/confusion_matrix.png (predicted_vs_true.png)."""
    section: dict[str, Any] = {}
    for which, analysis in analyses.items():
        scalars, details = analysis.result()
        results[which].update({f"test/{k}": v for k, v in scalars.items()})
        section[which] = details
    best = analyses["best"]
    title = f"{folder.path.name}: best weights (epoch {results['best'].get('epoch')}), test split"
    if task == "regression":
        rundir.write_bytes(folder.predicted_vs_true, charts.predicted_vs_true(*(t.numpy() for t in best.predictions()), title))
        return {"outputs": {"best": section["best"], "final": section["final"]}}
    rundir.write_bytes(folder.confusion_matrix, charts.confusion_matrix(section["best"]["confusion_matrix"], best.names, title))
    return {"classes": {"names": best.names, "best": section["best"], "final": section["final"]}}


def regression_baselines(data: Data, best: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """Regression only: the naive and linear baselines' test errors and the model's MAE relative to them."""
    found = baselines.baselines(data)
    return {"baselines": baselines.compared(found, best, final)} if found else {}


def spawn_ranks(cfg: DictConfig, folder: RunDir, resumed: dict[str, Any] | None) -> dict[str, Any]:
    """`trainer.devices=N`: train in N new DDP processes on this machine; their rank 0 writes the
    run folder, and its summary is returned (or its error raised) here."""
    devices = cfg.trainer.devices
    job = {"config": to_plain(cfg), "run_dir": str(folder.path), "resumed": resumed is not None,
           "hydra": hydra_job_info()}
    try:
        validate(cfg)  # bad input fails before any process starts
        distributed.spawn(rank_main, devices, job)
    except WorkerFailed as err:
        return ranks_outcome(err, folder, devices)
    except DlrunError as err:  # raised here, before any rank started: recorded as a rank 0 would
        RunRecord(folder, run_entries(), resume_point(resumed)).fail(err)
        raise
    return folder.read_summary()


def ranks_outcome(err: WorkerFailed, folder: RunDir, devices: int) -> dict[str, Any]:
    """What a failed rank means for the run, from what rank 0 recorded."""
    summary = folder.read_summary() if folder.holds_run() else {}
    if summary.get("status") == "completed" and not err.traceback:  # the run ended; a rank then died
        log.warning("%s after the run had completed; its results are kept", err)  # in gloo's teardown
        return summary
    if summary.get("status") == "interrupted":  # after a checkpoint (128 + signal), or a second Ctrl-C
        raise (Interrupted(err.signum, summary.get("steps", 0)) if err.signum else KeyboardInterrupt) from None
    if err.traceback:  # not an error dlrun names: show where it happened, as one process would
        raise RuntimeError(f"rank {err.rank} of the {devices}-process run failed:{err.traceback}") from None
    raise DlrunError(f"the {devices}-process run failed: {summary.get('error') or err}") from None


def rank_main(ranks: Ranks, job: dict[str, Any] | None = None) -> None:
    """A DDP rank in its own process: spawned by `spawn_ranks` with the job, or started by torchrun
    (ranks other than 0), which receive the job from rank 0. Errors that rank 0 records in the
    summary end the process with their exit code (128 + signal when interrupted)."""
    try:
        with distributed.process_group(ranks):
            job = job or ranks.share(None)
            folder = RunDir(Path(job["run_dir"]))
            rank_logging(ranks, folder.log)
            resumed = checkpoint.load(folder.last) if job["resumed"] else None
            run_here(OmegaConf.create(job["config"]), folder, resumed, ranks, job.get("hydra"))
    except DlrunError as err:
        raise SystemExit(err.exit_code) from None


def rank_logging(ranks: Ranks, path: Path) -> None:
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


def optional_sinks(cfg: DictConfig, folder: RunDir, record: RunRecord) -> list[Sink]:
    """TensorBoard and MLflow, as `cfg.logger` asks (a config saved before they existed: TensorBoard only);
    the MLflow run's id goes into the summary (`mlflow_run_id`), so that a resume continues that run."""
    logger = cfg.get("logger") or {"tensorboard": True, "mlflow": False}
    sinks: list[Sink] = []
    if logger["tensorboard"]:
        sinks.append(TensorBoardSink(folder.tensorboard))
    if logger["mlflow"]:
        params = {k: v for k, v in flatten(to_plain(cfg)).items() if not k.startswith(("logger", "resume"))}
        mlflow = MLflowSink(logger["mlflow_tracking_uri"], logger["mlflow_experiment"], folder.path.name, params,
                            folder.path, record.summary.get("mlflow_run_id"))
        record.update(mlflow_run_id=mlflow.run_id)
        sinks.append(mlflow)
    return sinks


def open_resume(resume: str, folder: RunDir) -> dict[str, Any]:
    """The last checkpoint of the run to continue, refused if it is not that run's own. Besides
    `resume=`, only the run's own overrides may be given (a requeued sweep job repeats them,
    see hydra_ext/launchers.py)."""
    last = rundir.resume_checkpoint(resume)
    if HydraConfig.initialized():
        own = set(OmegaConf.load(folder.hydra_overrides)) if folder.hydra_overrides.is_file() else set()
        others = [o for o in HydraConfig.get().overrides.task
                  if not o.startswith(("resume=", "trainer.epochs=")) and o not in own]
        if others:
            raise ConfigError(
                f"resume={resume} continues the run with the config saved in its checkpoint; drop the other "
                f"overrides ({' '.join(others)}); to train for more epochs add trainer.epochs=N, to change "
                "anything else start a new run"
            )
    ckpt = checkpoint.load(last)
    rundir.check_belongs(folder, ckpt, last)
    rundir.read_metrics(folder)  # a damaged record is refused before anything is written
    return ckpt


def resumed_config(resumed: dict[str, Any], folder: RunDir, resume: str, given: DictConfig) -> DictConfig:
    """The config saved in the checkpoint (checked: see config/targets.py), trained on to
    `trainer.epochs=N` when the resume command says so."""
    cfg = checkpoint.config_of(resumed, folder.last, trusted_targets(),
                               consent=f"dlrun resume={resume} {{group}}._target_={{target}}")
    if not (HydraConfig.initialized() and any(o.startswith("trainer.epochs=") for o in HydraConfig.get().overrides.task)):
        return cfg
    epochs, done = given.trainer.epochs, resumed["state"]["epoch"]
    if epochs < max(done, 1):
        raise ConfigError(f"trainer.epochs={epochs} is invalid with resume=: the run has completed {done} epochs")
    if epochs != cfg.trainer.epochs and cfg.scheduler._target_ == "dlrun.optim.onecycle_lr":
        raise ConfigError(f"trainer.epochs={epochs} is invalid with resume=: scheduler=onecycle planned its cycle "
                          f"for {cfg.trainer.epochs} epochs; start a new run to train longer")
    cfg.trainer.epochs = epochs
    return cfg


def trusted_targets() -> list[str]:
    """The `_target_`s given on this command line: the user's consent to run that code when a
    saved config names it (a `model=custom` run resumed, or a requeued sweep job)."""
    if not HydraConfig.initialized():
        return []
    return [o.split("=", 1)[1] for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].endswith("._target_")]


def resume_point(resumed: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where a resumed run continues (epoch, batch, step), for its summary."""
    return None if resumed is None else {k: resumed["state"][k] for k in ("epoch", "batch", "step")}


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, checkpoints and stops. A second signal stops at once."""
    stop = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise StopNow(signum)
        stop.signum = signum
        log.warning("%s received: finishing the current step and writing a checkpoint", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def run_entries(job_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a new run's summary starts with: the Hydra job's overrides and choices (`job_info`, or
    this process's Hydra job), the versions and the git commit."""
    return {
        **(hydra_job_info() if job_info is None else job_info),
        "versions": {"dlrun": dlrun.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "git_sha": git_sha(),
    }


def hydra_job_info() -> dict[str, Any]:
    """The command-line overrides and chosen group options, when running under Hydra."""
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith(("hydra", "schema"))}
    job = {"job": hc.job.num} if hc.mode == RunMode.MULTIRUN else {}  # the sweep's job number
    return {"overrides": list(hc.overrides.task), "choices": choices, **job}


def git_sha() -> str | None:
    """The commit of the working directory's repository, if it is one (for reproducibility)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
