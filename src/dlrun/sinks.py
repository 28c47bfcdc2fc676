"""Where metrics go: the rich console display, the run's metrics file, the log, TensorBoard and MLflow.

A sink has four methods, called by the training loop:
  start(epochs, total_steps, done_steps)  once, before the first step (done_steps > 0 when resuming)
  step(epoch, step, loss, samples_per_s)  every `trainer.log_every` steps
  epoch(record)                           once per epoch with that epoch's metrics
  close(summary)                          once, with the run's summary (None if the run failed)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from dlrun.rundir import RunDir, RunRecord, append_line, read_metrics, write_bytes

log = logging.getLogger("dlrun")


class Sink(Protocol):
    def start(self, epochs: int, total_steps: int, done_steps: int) -> None: ...
    def step(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None: ...
    def epoch(self, record: dict[str, Any]) -> None: ...
    def close(self, summary: dict[str, Any] | None) -> None: ...


def format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if key != "samples_per_s" else f"{value:,.0f}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


class JsonlSink:
    """Appends one JSON object per epoch to the run's metrics file (one line, one write)."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir, self.path = run_dir, run_dir.metrics

    def keep_epochs(self, last_epoch: int) -> None:
        """Drop records after `last_epoch` (written after the checkpoint a run resumes from)."""
        records = read_metrics(self.run_dir)
        kept = [r for r in records if r["epoch"] <= last_epoch]
        if kept != records:
            write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def start(self, epochs: int, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None:
        pass

    def epoch(self, record: dict[str, Any]) -> None:
        append_line(self.path, json.dumps(record))

    def close(self, summary: dict[str, Any] | None) -> None:
        pass


class LogSink:
    """One line per epoch in the run's log (dlrun.log)."""

    def start(self, epochs: int, total_steps: int, done_steps: int) -> None:
        log.info("training: %d epochs, %d steps%s", epochs, total_steps, f", from step {done_steps}" if done_steps else "")

    def step(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None:
        pass

    def epoch(self, record: dict[str, Any]) -> None:
        log.info(format_record(record))

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            if summary.get("stopped_early"):
                log.info(stopped_early(summary))
            log.info("finished: %s", json.dumps(summary.get("best", {})))


class ConsoleSink:
    """A rich progress display during training and a summary table at the end."""

    def __init__(self, job: int | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console()
        self.console.on_broken_pipe = self.reader_gone
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}  {task.fields[sps]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,  # logs and pipes get the epoch lines only
        )
        self.task = None
        # In a sweep whose jobs share a console (launcher=local_parallel), every line names its job.
        self.prefix = "" if job is None else f"[job {job}] "
        self.run: dict[str, Any] = {}
        self.model_table: str | None = None

    def say(self, what: Any) -> None:
        """A line (never cut to the console's width), or a table."""
        self.console.print(what, markup=False, highlight=False, soft_wrap=isinstance(what, str))

    def reader_gone(self) -> None:
        """The console's reader has gone (`dlrun ... | head` closed the pipe): the run goes on without a console,
        its log keeps every epoch line. (rich's default ends the process with SystemExit(1), mid-run.)"""
        import os

        self.console.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere
        log.warning("the console's reader has gone (a broken pipe): the run goes on, its epoch lines are in dlrun.log")

    def begin(self, summary: dict[str, Any], model_table: str | None = None) -> None:
        """What the run is (the summary as it stands before training, and the model's layer table if asked),
        said when training starts."""
        self.run, self.model_table = summary, model_table

    def start(self, epochs: int, total_steps: int, done_steps: int) -> None:
        for line in start_lines(self.run, epochs, total_steps, done_steps) if self.run else []:
            self.say(f"{self.prefix}{line}")
        for line in self.model_table.splitlines() if self.model_table else []:
            self.say(f"{self.prefix}{line}")
        self.progress.start()
        self.task = self.progress.add_task(  # no loss to show before the first log interval
            "train", total=total_steps, completed=done_steps, epoch=1, epochs=epochs, loss="-", sps="-"
        )

    def step(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None:
        self.progress.update(self.task, completed=step, epoch=epoch, loss=f"{loss:.4f}", sps=f"{samples_per_s:,.0f}")

    def epoch(self, record: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=record["step"], epoch=record["epoch"],
                             loss=f"{record['train/loss']:.4f}")
        epochs = self.progress.tasks[0].fields["epochs"]
        line = f"{self.prefix}epoch {record['epoch']:>{len(str(epochs))}}/{epochs}"
        for split in ("train", "val"):
            metrics = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items() if k.startswith(split + "/")]
            if metrics:
                line += f"  {split} " + " ".join(metrics)
        line += f"  lr {record['lr']:.3g}  {record['samples_per_s']:,.0f} samples/s"
        self.say(line)

    def close(self, summary: dict[str, Any] | None) -> None:
        self.progress.stop()
        if summary is None:
            return
        if summary.get("stopped_early"):
            self.say(f"{self.prefix}{stopped_early(summary)}")
        self.say(summary_table(summary))
        if (swa := summary.get("swa")) and swa["averaged_epochs"]:
            scores = "  ".join(f"{k} {v:.4f}" for k, v in swa.items() if "/" in k)
            self.say(f"{self.prefix}stochastic weight averaging of epochs {swa['start']}..{summary['epochs']}: {scores} "
                     "(checkpoints/swa.pt)")
        # Whole, never cut to the terminal's width: users copy it to resume, report and predict.
        self.say(f"{self.prefix}run folder: {summary['run_dir']}")


def start_lines(run: dict[str, Any], epochs: int, total_steps: int, done_steps: int) -> list[str]:
    """The lines a run prints before its first step, on any output (a terminal, a log, a pipe): what trains on
    what and where its folder is; a distilled run's teacher and what its training loss is; MLflow's store."""
    data, model, sizes = run["data"], run["model"], run["data"]["sizes"]
    where = f"{run['device']}, {run['threads']} thread{'s' if run['threads'] != 1 else ''}"
    where += f", {run['processes']} processes" if run.get("processes", 1) > 1 else ""
    lines = [f"training {model['class']} ({model['parameters']['total']:,} parameters) on {data['name']} "
             f"({sizes['train']:,} train / {sizes['val']:,} val / {sizes['test']:,} test) for {epochs} "
             f"epoch{'s' if epochs != 1 else ''}, "
             f"{total_steps:,} steps" + (f", from step {done_steps:,}" if done_steps else "") + f" ({where})",
             f"run folder: {run['run_dir']}"]
    if found := run.get("lr_find"):
        what = "no suggestion: the loss diverged too soon; lower trainer.lr_find_min_lr" \
            if found["suggestion"] is None else f"suggestion {found['suggestion']:.3g}, " + (
                "the run's optimizer.lr" if found["applied"] else "not applied (trainer.lr_find_apply=false)")
        lines.append(f"lr_find: {found['steps']} steps from {found['min_lr']:g} to {found['max_lr']:g}: {what} "
                     f"(curve: plots/lr_find.png)")
    if teacher := run.get("teacher"):
        alpha = teacher["alpha"]
        lines.append(f"distilled from {teacher['run_dir']} ({teacher['parameters']:,} parameters, test/acc "
                     f"{teacher['test/acc']:.4f}): train loss = {alpha:g}·T²·KL(teacher ‖ student) + "
                     f"{1 - alpha:g}·cross-entropy, T = {teacher['temperature']:g}; val and test losses are plain "
                     "cross-entropy")
    if wandb_dir := run.get("wandb_run_dir"):
        lines.append(f"W&B run {run['run_id']} ({run['wandb_mode']}) in {wandb_dir}" + (
            f" (to upload: wandb sync {wandb_dir})" if run["wandb_mode"] == "offline" else ""))
    if run.get("mlflow_run_id"):
        uri = run["mlflow_tracking_uri"]
        lines.append(f"MLflow run {run['mlflow_run_id']} in {uri} (to browse: mlflow ui --backend-store-uri {uri})")
    return lines


def stopped_early(summary: dict[str, Any]) -> str:
    monitor, best = summary["monitor"], summary.get("best", {})
    return (f"early stopping at epoch {summary['stopped_early']}: {monitor['metric']} stopped improving "
            f"(best {_number(summary.get('monitor_value'))} at epoch {best.get('epoch', '-')})")


def full_batch(latency_ms: dict[str, float]) -> str | None:
    """The full-batch key of a summary's `latency_ms` ({"batch_1": .., "batch_64": ..} -> "batch_64")."""
    return next((k for k in latency_ms if k != "batch_1"), None)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _confused_pairs(details: dict[str, Any]) -> str:
    """'3→8 ×4' per line, for the pairs a weights' test analysis found most often confused."""
    pairs = details.get("most_confused", [])
    return "\n".join(f"{p['true']}→{p['predicted']} ×{p['count']}" for p in pairs) or "none"


def summary_table(summary: dict[str, Any]):
    from rich.table import Table

    best, final = summary.get("best", {}), summary.get("final", {})
    table = Table(title=f"dlrun: {summary['status']}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column(f"best (epoch {best.get('epoch', '-')})", justify="right")
    table.add_column("final", justify="right")
    for key in sorted(k for k in set(best) | set(final) if "/" in k):
        table.add_row(key, _number(best.get(key)), _number(final.get(key)))
    if summary.get("baselines"):  # regression: the model's test MAE as a multiple of each baseline's
        table.add_section()
        for name, base in summary["baselines"].items():
            ratio = base["model_mae_ratio"]
            table.add_row(f"{name} baseline test/mae {base['mae']:.4f}",
                          *(f"model ×{ratio[w]:.3f}" if w in ratio else "-" for w in ("best", "final")))
    if summary.get("classes"):  # classification: the test split's most confused pairs (see metrics.py)
        table.add_section()
        table.add_row("most confused (true→predicted)",
                      *(_confused_pairs(summary["classes"].get(w, {})) for w in ("best", "final")))
    params, cost = summary["model"]["parameters"], summary["cost"]
    latency = cost["latency_ms"]
    full = full_batch(latency)
    table.add_section()
    table.add_row("parameters", f"{params['total']:,}", f"{params['trainable']:,} trainable")
    table.add_row("size, FLOPs/sample", f"{cost['size_mb']:.3f} MiB", f"{cost['flops_per_sample']:,}")
    table.add_row(f"latency (batch 1, {full.split('_')[1]}; {cost['latency']['threads']} threads)",
                  f"{latency['batch_1']:.3f} ms", f"{latency[full]:.3f} ms")
    table.add_row("peak memory", f"{cost['peak_memory_mb']:,.0f} MiB", cost["memory"])
    after = summary.get("after_training_s")
    table.add_row("wall time" + ("" if after is None else f" (after training {after:.1f} s)"),
                  f"{summary['wall_time_s']:.1f} s", f"{summary['train']['samples_per_s']:,.0f} samples/s")
    processes = summary.get("processes", 1)
    table.add_row("device", summary["device"], f"{processes} processes (DDP)" if processes > 1 else "")
    return table


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The metric entries of an epoch record (everything numeric but the epoch and step counters)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """Event files in <run>/tensorboard. One x-axis for every scalar, the global step: the training loss
    every log interval, each epoch's metrics (and `epoch` itself) at the epoch's last step, and at the
    end the test metrics of the final and of the best weights (`final/test/...`, `best/test/...`), which are
    also the metrics of the run's hparams entry (the flattened config, `params`: TensorBoard's HPARAMS tab).
    With `histograms`, each epoch's weights and last gradients per parameter (`weights/<name>`,
    `gradients/<name>`) of the model given to `watch`; with `images`, the best weights' test confusion matrix."""

    def __init__(self, log_dir: Path, params: dict[str, Any], histograms: bool = False, images: bool = False) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.params, self.histograms, self.images = params, histograms, images
        self.model: Any = None

    def watch(self, model: Any) -> None:
        """The model whose weights and gradients the histograms show."""
        self.model = model

    def start(self, epochs: int, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None:
        self.writer.add_scalar("train/loss_step", loss, step)

    def epoch(self, record: dict[str, Any]) -> None:
        self.writer.add_scalar("epoch", record["epoch"], record["step"])
        for key, value in _numbers(record).items():
            self.writer.add_scalar(key, value, record["step"])
        if self.histograms and self.model is not None:
            for name, p in self.model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach(), record["step"])
                if p.grad is not None:  # the epoch's last step's (the optimizer clears them at the next step)
                    self.writer.add_histogram(f"gradients/{name}", p.grad, record["step"])

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.params.items()}
            # run_name ".": the hparams entry in this run's own folder (torch's default makes a new one)
            self.writer.add_hparams(hparams, final_and_best(summary), run_name=".", global_step=summary["steps"])
            if self.images and summary.get("classes"):
                from dlrun import plots

                classes = summary["classes"]
                figure = plots.confusion_matrix(classes["best"]["confusion_matrix"], classes["names"],
                                                "best weights, test split")
                self.writer.add_figure("test/confusion_matrix", figure, summary["steps"])
        self.writer.close()


def final_and_best(summary: dict[str, Any]) -> dict[str, float]:
    """The metrics of the final and of the best weights: {"final/test/acc": ..., "best/test/acc": ...}."""
    return {f"{prefix}/{key}": value for prefix in ("final", "best") for key, value in _numbers(summary.get(prefix, {})).items()}


class MLflowSink:
    """One MLflow run per dlrun run: the config as params, every epoch's metrics, the final and best
    metrics, and the run folder as artifacts, in the tracking store at `tracking_uri`.

    `run_id`: the MLflow run of a resumed dlrun run (its summary's `mlflow_run_id`), continued if the
    store still has it; the epochs after the checkpoint are logged again at their steps, and params are
    logged only where new (MLflow params cannot change: a resume's `trainer.epochs=N` becomes the tag
    `dlrun.resumed.trainer.epochs`)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], run_dir: Path,
                 run_id: str | None = None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client, self.run_dir = MlflowClient(tracking_uri), run_dir
        logged: dict[str, str] = {}
        try:
            earlier = self.client.get_run(run_id) if run_id else None
        except MlflowException:  # another store, or the run was deleted: a new MLflow run
            earlier = None
        if earlier is not None:
            self.run_id, logged = run_id, dict(earlier.data.params)
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(self._experiment(experiment, tracking_uri), run_name=run_name,
                                                 tags={"dlrun.run_dir": str(run_dir)}).info.run_id
        values = {key: str(value) for key, value in params.items()}
        for key in sorted(k for k in values if k in logged and values[k] != logged[k]):
            self.client.set_tag(self.run_id, f"dlrun.resumed.{key}", values[key])
        self._log(params=[Param(key, value) for key, value in values.items() if key not in logged])

    def _experiment(self, name: str, tracking_uri: str) -> str:
        """The experiment's id, made if need be (a SQLite store keeps its artifacts beside the database)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        artifacts = None
        if tracking_uri.startswith("sqlite:///"):
            artifacts = (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlflow-artifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def start(self, epochs: int, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None:
        pass

    def _log(self, metrics: dict[str, float] | None = None, step: int = 0, params: list | None = None) -> None:
        """One batched write to the store (one transaction, not one per value)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(key, value, stamp, step) for key, value in (metrics or {}).items()]
        self.client.log_batch(self.run_id, metrics=batch, params=params or [])

    def epoch(self, record: dict[str, Any]) -> None:
        self._log({**_numbers(record), "epoch": record["epoch"]}, step=record["step"])

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self._log(final_and_best(summary), step=summary["steps"])
            self.client.log_artifacts(self.run_id, str(self.run_dir))
        self.client.set_terminated(self.run_id, "FINISHED" if summary is not None else "FAILED")


class WandbSink:
    """One Weights & Biases run per dlrun run (logger=wandb): the config, every epoch's metrics at its step, the
    final and best metrics in the W&B summary. Offline by default: the run's files go to <run>/wandb/ and
    `wandb sync` uploads them later. Its id is the dlrun run's (`run_id`), so a resume continues the same W&B run.
    The W&B run is an object of its own (reinit="create_new": no global active run), quiet on the console."""

    def __init__(self, project: str, mode: str, run_name: str, run_id: str, params: dict[str, Any], run_dir: Path):
        import wandb

        self.run = wandb.init(project=project, mode=mode, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                              config=params, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def start(self, epochs: int, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None:
        pass

    def epoch(self, record: dict[str, Any]) -> None:
        self.run.log({**_numbers(record), "epoch": record["epoch"]}, step=record["step"])

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.run.summary.update(final_and_best(summary))
        self.run.finish(exit_code=0 if summary is not None else 1)


def optional_sinks(logger: Any, folder: RunDir, record: RunRecord, params: dict[str, Any]) -> list[Sink]:
    """TensorBoard, MLflow and W&B, as `cfg.logger` asks, each given `params` (the flattened config); MLflow's
    run id goes into the summary (`mlflow_run_id`), W&B's is the run's own, so that a resume continues them."""
    sinks: list[Sink] = []
    if logger.tensorboard:
        sinks.append(TensorBoardSink(folder.tensorboard, params, logger.histograms, logger.plots))
    if logger.mlflow:
        mlflow = MLflowSink(logger.mlflow_tracking_uri, logger.mlflow_experiment, folder.path.name, params,
                            folder.path, record.summary.get("mlflow_run_id"))
        record.update(mlflow_run_id=mlflow.run_id, mlflow_tracking_uri=absolute(logger.mlflow_tracking_uri))
        sinks.append(mlflow)
    if logger.wandb:
        # W&B makes its folder, wandb/ (RunDir.wandb), in the directory it is given
        wandb = WandbSink(logger.wandb_project, logger.wandb_mode, folder.path.name, record.run_id, params, folder.path)
        record.update(wandb_mode=logger.wandb_mode, wandb_run_dir=str(Path(wandb.run.dir).parent))
        sinks.append(wandb)
    return sinks


def absolute(tracking_uri: str) -> str:
    """A SQLite store's URI with its path made absolute (the default is relative to where dlrun ran)."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).resolve()}"
    return tracking_uri


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"channels": [32, 64]}} -> {"model.channels": [32, 64]}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
