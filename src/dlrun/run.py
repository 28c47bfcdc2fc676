"""`run(cfg) -> dict`: wires the pieces together. The CLI, tests and sweepers call this.

`run` decides the config and the run folder once and takes ownership of the folder; `run_here`
is the run itself, as a short list of named steps. What a resumed run continues from is
resume.py's; what the end of a run measures is evaluation.py's.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dlrun
from dlrun import checkpoint, distributed, evaluation, plots, resume, rundir
from dlrun.checkpoint import Checkpointer
from dlrun.config.schema import to_plain
from dlrun.config.validate import check_data_parallel, check_search_direction, validate
from dlrun.cost import count_parameters, layer_table
from dlrun.data import Data, build_dataset, channels_last, quick_check_subsets
from dlrun.device import deterministic_algorithms, resolve_device, seed_everything, set_threads, use_channels_last
from dlrun.distributed import SINGLE, Ranks
from dlrun.errors import ConfigError, DlrunError, Interrupted, NonFiniteLoss, WorkerFailed
from dlrun.lr_find import lr_find
from dlrun.metrics import TestAnalysis
from dlrun.models import build_model
from dlrun.optim import build_optimizer, build_scheduler
from dlrun.rundir import RunDir, RunRecord
from dlrun.sinks import ConsoleSink, JsonlSink, LogSink, Sink, flatten, optional_sinks
from dlrun.train import LoopSettings, Parts, StopFlag, TrainState, fit, steps_per_epoch, stop_on_signals


def run(cfg: DictConfig, run_dir: str | Path | None = None, checked: bool = False) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the summary written to the run folder.

    `run_dir` defaults to Hydra's output directory for this job. With `cfg.resume` set, the
    run continues in that folder from its last checkpoint, with the config saved there. With
    `trainer.devices=N` it spawns N DDP processes, and under torchrun this process is rank 0
    (see distributed.py); either way the config and the run folder are decided here, once,
    and this process owns the folder until the run ends. `checked`: the caller has validated
    this very config (the CLI's single runs, refused in the start callback before Hydra made
    the folder).
    """
    slurm = distributed.slurm_env()
    if slurm is not None and not slurm.is_main:  # another task of a multi-task Slurm job: the job comes from task 0
        rank_main(slurm)
        return {}
    given = cfg.get("resume")
    folder = RunDir(Path(given).expanduser().resolve() if given else Path(run_dir or HydraConfig.get().runtime.output_dir))
    if not given and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        done, given = resume.earlier_start(folder)
        if done:
            return rundir.read_summary(folder.path)
    with rundir.own(folder):
        resumed = None
        if given:
            cfg, resumed = resume.continue_run(given, folder, cfg)
        else:  # under the lock: the start callback's check could not see a run that started since
            rundir.check_fresh(folder)
        if resumed is not None or not checked:  # Python callers, sweep jobs, resumed configs: before any rank starts
            refused_unless_valid(cfg, folder, resumed)
        ranks = distributed.torchrun_env() or slurm
        if ranks is not None:
            if ranks is not slurm and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise ConfigError("under torchrun dlrun runs one job; sweep with trainer.devices=N instead")
            with distributed.process_group(ranks):
                ranks.share({"config": to_plain(cfg), "run_dir": str(folder.path), "resumed": resumed is not None})
                return run_here(cfg, folder, resumed, ranks)
        if cfg.trainer.devices > 1:
            return spawn_ranks(cfg, folder, resumed)
        return run_here(cfg, folder, resumed)


def refused_unless_valid(cfg: DictConfig, folder: RunDir, resumed: dict[str, Any] | None) -> None:
    """`validate(cfg)`; a refusal is recorded in the run folder as the run's failure (a sweep's summary lists
    the job with its error)."""
    try:
        validate(cfg, resumed=resumed is not None)
    except DlrunError as err:
        RunRecord(folder, run_entries(), resume.resume_point(resumed)).fail(err)
        raise


def run_here(cfg: DictConfig, folder: RunDir, resumed: dict[str, Any] | None, ranks: Ranks = SINGLE,
             job_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run itself, in this process: rank `ranks.rank` of a DDP run, or the only process.

    Only rank 0 writes (summary, metrics, checkpoints, display) and returns the summary;
    the other ranks return an empty dict.
    """
    clock, main = time.perf_counter(), ranks.is_main
    entries = run_entries(job_info)
    record = RunRecord(folder, entries, resume.resume_point(resumed), run_id=resumed and resumed.get("run_id"),
                       write=main)
    jsonl, console = JsonlSink(folder), ConsoleSink(entries.get("job")) if main else None
    sinks: list[Sink] = [console, jsonl, LogSink()] if main else []
    try:
        with stop_on_signals() as stop, ExitStack() as scope:
            sinks += optional_sinks(cfg.logger, folder, record, run_params(cfg)) if main else []
            device = rank_device(cfg, ranks)
            scope.enter_context(deterministic_algorithms(cfg.trainer.deterministic))
            seed_everything(cfg.trainer.seed)
            data = load_data(cfg, device, ranks)
            settings = LoopSettings.of(cfg.trainer, data.spec.task)
            check_sweep_direction(settings)
            parts, data = build_parts(cfg, settings, data, device, ranks, resumed is not None)
            for sink in sinks:
                if hasattr(sink, "watch"):  # TensorBoard's histograms
                    sink.watch(parts.model)
            if settings.lr_find and resumed is None:  # a resumed run goes on with the lr it found (in its config)
                record.update(lr_find=find_lr(cfg, folder, parts, data, settings, ranks))
            record.update(**describe(parts, data, settings, device, ranks))
            if main:
                console.begin(record.summary, model_summary(folder, record, parts, data, settings, device))
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
            results, best = evaluation.final_results(parts, checkpointer, data, settings, state, device, *trained) \
                if main else ({}, None)
            if stop.signum:  # during the final evaluation: the run is checkpointed, its results are not
                raise Interrupted(stop.signum, state.step, checkpointer.has_last())
            if main and cfg.logger.plots:
                draw_pictures(folder, {**record.summary, **results}, data, best)
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


def draw_pictures(folder: RunDir, summary: dict[str, Any], data: Data, best: TestAnalysis) -> None:
    """plots/: the run's learning curves, and its best weights' confusion matrix or, for regression, their
    predictions against the targets (logger.plots=true)."""
    predictions = tuple(t.numpy() for t in best.predictions()) if data.spec.task == "regression" else None
    plots.run_pictures(folder, summary, predictions)


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
    """The device this process trains on, with its CPU threads (a rank's own GPU or its share of the CPU under DDP)."""
    device = resolve_device(cfg.device.type)
    set_threads(cfg.device.threads)
    return distributed.rank_device(device, ranks, cfg.device.threads) if ranks.world > 1 else device


def load_data(cfg: DictConfig, device: torch.device, ranks: Ranks) -> Data:
    """The dataset on the device, cut to the quick-check subsets if asked, checked for DDP."""
    trainer = cfg.trainer
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
                ranks: Ranks, resumed: bool = False) -> tuple[Parts, Data]:
    """Model, optimizer, scheduler and the optional compiled module, GradScaler, EMA, teacher and DDP
    wrapper; with `channels_last`, the data is converted to match."""
    model = build_model(cfg.model, data.spec.input_shape, data.spec.num_outputs, pretrained=not resumed).to(device)
    if use_channels_last(settings.channels_last, model, data.spec.input_shape, device, settings.amp_dtype):
        model, data = model.to(memory_format=torch.channels_last), channels_last(data)
    parts = Parts(
        model,
        *optimizer_and_scheduler(cfg, settings, model, data),
        compiled=torch.compile(model) if settings.compile else None,
        scaler=torch.amp.GradScaler(device.type) if settings.amp_dtype is torch.float16 else None,
        ema=AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
        if settings.ema_decay > 0 else None,
        swa=AveragedModel(model) if settings.swa_start > 0 else None,  # equal average; batch norm: update_bn at the end
    )
    if settings.distill.teacher is not None:  # reloaded on resume too: it is part of the loss
        parts.teacher = load_teacher(settings.distill.teacher, data.describe(), device)
    if ranks.world > 1:
        parts.ddp = distributed.wrap(parts.eval_module, device)
    return parts, data


def optimizer_and_scheduler(cfg: DictConfig, settings: LoopSettings, model: torch.nn.Module, data: Data) -> tuple:
    optimizer = build_optimizer(cfg.optimizer, model, settings.decay_norm_and_bias)
    steps = steps_per_epoch(len(data.splits["train"]), settings)
    return optimizer, build_scheduler(cfg.scheduler, optimizer, steps, settings.epochs * steps, settings.mode)


def find_lr(cfg: DictConfig, folder: RunDir, parts: Parts, data: Data, settings: LoopSettings,
            ranks: Ranks) -> dict[str, Any]:
    """trainer.lr_find: the range test (lr_find.py; the parts are left as they were), its curve in
    plots/lr_find.png and, with lr_find_apply, `optimizer.lr` set to the suggestion in the run's config (which its
    checkpoints keep) and the optimizer and scheduler built anew with it. Returns the summary's `lr_find`."""
    if ranks.world > 1:
        raise ConfigError("trainer.lr_find runs in one process: find the lr with trainer.devices=1, then train with "
                          "optimizer.lr=<the suggestion> under torchrun")
    found = lr_find(parts, data, settings)
    plots.save(plots.lr_find_curve(found, f"{folder.path.name}: learning-rate range test"), folder.lr_find)
    applied = settings.lr_find_apply and found["suggestion"] is not None
    if applied:
        cfg.optimizer.lr = found["suggestion"]
        parts.optimizer, parts.scheduler = optimizer_and_scheduler(cfg, settings, parts.model, data)
    return {k: found[k] for k in ("suggestion", "steps", "diverged", "min_lr", "max_lr")} | {"applied": applied}


# what a distillation teacher's data description must share with the student's (mean/std follow from these)
TEACHER_MATCHES = ("name", "task", "input_shape", "num_outputs", "classes")


def load_teacher(folder: str, described: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """`trainer.distill.teacher`: that run's best model, frozen in eval mode on `device`; its data must be the
    student's (the config-level checks ran before: config/validate.py validate_distill)."""
    key = f"trainer.distill.teacher={folder}"
    if described["task"] != "classification":
        raise ConfigError(f"{key} is invalid: distillation needs a classification dataset "
                          f"({described['name']} is {described['task']})")
    teacher, _, theirs = checkpoint.load_model(RunDir(Path(folder).expanduser().resolve()).best,
                                               resume.trusted_targets(), "{group}._target_={target} on the command line")
    differs = [k for k in TEACHER_MATCHES if theirs.get(k) != described.get(k)]
    if differs:
        k = differs[0]
        raise ConfigError(f"{key} is invalid: the teacher was trained on other data ({k} {theirs.get(k)!r}, "
                          f"the student's {described.get(k)!r})")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device)


def model_summary(folder: RunDir, record: RunRecord, parts: Parts, data: Data, settings: LoopSettings,
                  device: torch.device) -> str | None:
    """trainer.model_summary: the model's layer table, written to the run folder (and returned for the console);
    its time goes into the summary (`model_summary_s`: what it costs the run)."""
    if not settings.model_summary:
        return None
    started = time.perf_counter()
    table = layer_table(parts.model, data.spec.input_shape, device, settings.model_summary_depth)
    rundir.write_bytes(folder.model_summary, table.encode())
    record.update(model_summary_s=time.perf_counter() - started)
    return table


def describe(parts: Parts, data: Data, settings: LoopSettings, device: torch.device, ranks: Ranks) -> dict[str, Any]:
    """What the summary says about the run before it trains."""
    teacher = {}
    if parts.teacher is not None and ranks.is_main:
        teacher = {"teacher": evaluation.teacher_record(parts.teacher, settings.distill.teacher, data, settings)}
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
        **teacher,
    }


def run_params(cfg: DictConfig) -> dict[str, Any]:
    """The config as flat `group.key` params (MLflow's params, TensorBoard's hparams), without the logger's own keys
    and `resume`."""
    return {k: v for k, v in flatten(to_plain(cfg)).items() if not k.startswith(("logger", "resume"))}


def spawn_ranks(cfg: DictConfig, folder: RunDir, resumed: dict[str, Any] | None) -> dict[str, Any]:
    """`trainer.devices=N`: train in N new DDP processes on this machine; their rank 0 writes the
    run folder, and its summary is returned (or its error raised) here."""
    devices = cfg.trainer.devices
    job = {"config": to_plain(cfg), "run_dir": str(folder.path), "resumed": resumed is not None,
           "hydra": hydra_job_info()}
    try:
        distributed.spawn(rank_main, devices, job)
    except WorkerFailed as err:
        return distributed.outcome(err, folder, devices)
    except DlrunError as err:  # raised here, before any rank started: recorded as a rank 0 would
        RunRecord(folder, run_entries(), resume.resume_point(resumed)).fail(err)
        raise
    return folder.read_summary()


def rank_main(ranks: Ranks, job: dict[str, Any] | None = None) -> None:
    """A DDP rank in its own process: spawned by `spawn_ranks` with the job, or started by torchrun
    (ranks other than 0), which receive the job from rank 0 (which validated its config). Errors that
    rank 0 records in the summary end the process with their exit code (128 + signal when interrupted)."""
    try:
        with distributed.process_group(ranks):
            job = job or ranks.share(None)
            folder = RunDir(Path(job["run_dir"]))
            distributed.rank_logging(ranks, folder.log)
            resumed = checkpoint.load(folder.last) if job["resumed"] else None
            run_here(OmegaConf.create(job["config"]), folder, resumed, ranks, job.get("hydra"))
    except DlrunError as err:
        raise SystemExit(err.exit_code) from None


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
    # the sweep's job number, and which sweep (worker) launched it: several share a study's folder
    job = {"job": hc.job.num, "sweep_id": hc.job.env_set.get(rundir.SWEEP_ID)} if hc.mode == RunMode.MULTIRUN else {}
    elastic = {"elastic_run_id": os.environ[rundir.ELASTIC_RUN_ID]} if rundir.ELASTIC_RUN_ID in os.environ else {}
    return {"overrides": list(hc.overrides.task), "choices": choices, **job, **elastic}


def git_sha() -> str | None:
    """The commit of the working directory's repository, if it is one (for reproducibility)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
