"""The end of a run: the test split under the final and the best weights, what they get right and wrong
(metrics.py), a regression's baselines, the training speed and what the model costs (cost.py); and, for a
distilled run, its teacher's score."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import update_bn

from dlrun import baselines
from dlrun.checkpoint import Checkpointer
from dlrun.cost import count_parameters, model_cost, peak_memory_mb
from dlrun.data import Data
from dlrun.metrics import TestAnalysis, analysis_for
from dlrun.train import LoopSettings, Parts, TrainState, evaluate, evaluate_split, steps_per_epoch


def final_results(parts: Parts, checkpointer: Checkpointer, data: Data, settings: LoopSettings, state: TrainState,
                  device: torch.device, seconds: float, steps: int) -> tuple[dict[str, Any], TestAnalysis]:
    """The summary's results: the test split under the final weights (after the last epoch) and the best ones
    (at the best monitored value), the training speed and the model's cost. Also returns the best weights'
    test analysis (for the run's pictures)."""
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
    analysed = analyse_test(analyses, {"final": final, "best": best}, data.spec.task)
    averaged = swa_results(parts, checkpointer, data, settings, state) if parts.swa is not None else {}
    top_k = {"top_k": [{"epoch": int(e), settings.monitor: v} for v, e in state.top_k]} if state.top_k else {}
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
        **averaged,
        **top_k,
    }, analyses["best"]


def swa_results(parts: Parts, checkpointer: Checkpointer, data: Data, settings: LoopSettings,
                state: TrainState) -> dict[str, Any]:
    """trainer.swa_start: the averaged weights with their batch-norm statistics recomputed over the training split
    (torch.optim.swa_utils.update_bn, unaugmented batches), scored on the validation and test splits and kept in
    checkpoints/swa.pt (a weights checkpoint, as best.pt: dlrun-predict and dlrun-export read it)."""
    swa = parts.swa
    averaged = int(swa.n_averaged)
    if averaged == 0:  # the run ended before swa_start (trainer.epochs, early stopping)
        return {"swa": {"start": settings.swa_start, "averaged_epochs": 0}}
    update_bn(data.splits["train"].batches(settings.eval_batch_size), swa.module)
    averaged_parts = replace(parts, model=swa.module, compiled=None, ema=None, swa=None, ddp=None)
    metrics = {**evaluate_split(averaged_parts, "val", data.splits["val"], settings),
               **evaluate_split(averaged_parts, "test", data.splits["test"], settings)}
    if checkpointer.write:
        checkpointer.save_weights({"model": swa.module.state_dict(), "ema": None}, state.epoch, metrics,
                                  checkpointer.run_dir.swa)
    return {"swa": {"start": settings.swa_start, "averaged_epochs": averaged, **metrics}}


def analyse_test(analyses: dict[str, TestAnalysis], results: dict[str, dict[str, Any]], task: str) -> dict[str, Any]:
    """What the final and best weights get right and wrong on the test split (see metrics.py): the
    scalars join their test results (`test/macro_f1`, `test/weighted_f1`, `test/top5_acc`; regression
    `test/rmse`), the details make the summary's `classes` (regression: `outputs`) section."""
    section: dict[str, Any] = {}
    for which, analysis in analyses.items():
        scalars, details = analysis.result()
        results[which].update({f"test/{k}": v for k, v in scalars.items()})
        section[which] = details
    if task == "regression":
        return {"outputs": {"best": section["best"], "final": section["final"]}}
    return {"classes": {"names": analyses["best"].names, "best": section["best"], "final": section["final"]}}


def regression_baselines(data: Data, best: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """Regression only: the naive and linear baselines' test errors and the model's MAE relative to them."""
    found = baselines.baselines(data)
    return {"baselines": baselines.compared(found, best, final)} if found else {}


def teacher_record(teacher: torch.nn.Module, folder: str, data: Data, settings: LoopSettings) -> dict[str, Any]:
    """A distilled run's teacher: its folder, size and score on the test split (evaluated once)."""
    scores = evaluate(teacher, data.splits["test"], settings.eval_batch_size, settings.amp_dtype, settings.task)
    return {"run_dir": str(Path(folder).expanduser().resolve()), "parameters": count_parameters(teacher)["total"],
            "temperature": settings.distill.temperature, "alpha": settings.distill.alpha,
            **{f"test/{k}": v for k, v in scores.items()}}
