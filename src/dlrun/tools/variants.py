"""The variants `dlrun-compress` makes of a run's best model and how each is measured (see tools/compress.py
for the command): every variant gets the test score and its change, parameters and FLOPs per sample (of the
float model it was made from), the size of its file and the median latency at batch 1 and at a full batch
(dlrun.cost's one measurement, the thread count recorded). Results go to <run>/compress.json, files to
<run>/variants/; `load_variant` opens a saved one."""

from __future__ import annotations

import copy
import io
import zlib
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from dlrun import checkpoint, rundir
from dlrun.compress import Plan, prune
from dlrun.compress.export import check_and_time, export_onnx, session
from dlrun.compress.quantize import HALF, Cast, compiled, dynamic_int8, static_int8
from dlrun.config.schema import score_name, to_plain
from dlrun.cost import LATENCY_METHOD, count_parameters, flops_per_sample, latency_entries, latency_pair, quiet, torch_threads
from dlrun.data import Data, build_dataset
from dlrun.errors import DlrunError
from dlrun.losses import loss_and_score
from dlrun.optim import build_optimizer
from dlrun.rundir import RunDir
from dlrun.train import LoopSettings, Parts, evaluate, fit

CPU = torch.device("cpu")


@dataclass
class Job:
    """The run being compressed: its folder, config (and its plain form, which variant files keep), data
    description and data, and the thread count."""

    folder: RunDir
    cfg: Any
    described: dict[str, Any]  # the checkpoint's data description (shapes, task, normalisation, classes)
    data: Data
    threads: int
    log: Callable[[str], None]
    latency_batch: int | None = None  # None: the run's trainer.batch_size

    task = property(lambda self: self.data.spec.task)
    metric = property(lambda self: f"test/{score_name(self.data.spec.task)}")
    shape = property(lambda self: tuple(self.data.spec.input_shape))
    batch = property(lambda self: self.latency_batch or self.cfg.trainer.batch_size)

    def save(self, name: str, state: dict[str, Any], model_cfg: Any = None, **extra: Any) -> Path:
        """variants/<name>.pt: the weights of the module `load_variant` returns, and what it is rebuilt from
        (the run's config, with the pruned model's one where it has its own; the data description)."""
        config = to_plain(self.cfg)
        path = self.folder.variant(name)
        checkpoint.save({"model": state, "variant": name, "config": {**config, "model": model_cfg or config["model"]},
                         "data": self.described, **extra}, path)
        return path

    def calibration(self) -> list[torch.Tensor]:
        """The first training batches, in order (static int8's calibration and Taylor importance's gradients)."""
        return [x for x, _ in islice(self.data.splits["train"].batches(self.cfg.trainer.batch_size), 8)]


def load_variant(path: Path, trust: Iterable[str] = ()) -> nn.Module:
    """A saved .pt variant as a ready model (on the CPU): the run's model (at its pruned widths for a
    structured-pruned one), transformed as it was, with its weights. Torch-Pruning is not needed.
    Its config may name only dlrun's builders, or what is in `trust`."""
    consent = "load_variant(path, trust=['{target}'])"
    return checkpoint.load_model(path, trust, consent, prepare=lambda model, saved: as_saved(model, saved, path))[0]


def as_saved(model: nn.Module, saved: dict[str, Any], path: Path) -> nn.Module:
    """The module a variant file's weights belong to: the float model, quantised or cast as it was."""
    variant = saved.get("variant")
    if not isinstance(variant, str):
        raise DlrunError(f"{path} is not a variant written by dlrun-compress (it names no variant)")
    if variant == "int8-dynamic":
        return dynamic_int8(model)
    return Cast(model, HALF[variant]) if variant in HALF else model


def serialized_mb(state: dict[str, Any]) -> tuple[float, float]:
    """Size of a state dict as torch.save writes it, and zlib-compressed (where pruning's zeros show)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    raw = buffer.getvalue()
    return len(raw) / 2**20, len(zlib.compress(raw, 6)) / 2**20


class OnnxRuntime(nn.Module):
    """An ONNX Runtime session called like a module (for `evaluate`)."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        self.session = session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])


def measure(job: Job, name: str, model: nn.Module, source: nn.Module, file: Path, timed: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    """One variant, measured like every other: test score, parameters and FLOPs (of `source`, the float
    model it was made from), file size, latency (`timed`, or timed here) at batch 1 and a full batch."""
    scores = evaluate(model, job.data.splits["test"], job.cfg.trainer.eval_batch_size, task=job.task)
    timed = timed or latency_pair(model, job.shape, job.batch, CPU, job.threads)
    job.log(f"{name}: {job.metric} {scores[score_name(job.task)]:.4f}")
    return {"name": name, "runtime": "eager", job.metric: scores[score_name(job.task)], "test/loss": scores["loss"],
            "parameters": count_parameters(source)["total"], "flops_per_sample": flops_per_sample(source, job.shape, CPU),
            "file": str(file), "file_mb": file.stat().st_size / 2**20, **latency_entries(timed), **extra}


def open_job(run_dir: Path, trust: Iterable[str], threads: int | None, log: Callable[[str], None]) -> tuple[Job, nn.Module]:
    """The run folder's best model, its config and its data rebuilt on the CPU."""
    folder = RunDir(run_dir)
    rundir.check_links(folder)  # variants/ and compress.json are written into it
    model, cfg, described = checkpoint.load_model(folder.best, trust)
    torch.manual_seed(cfg.trainer.seed)
    data = build_dataset(cfg.dataset, CPU)
    threads = threads or cfg.device.get("threads") or torch.get_num_threads()
    return Job(folder, cfg, described, data, threads, log), model


def compress(run_dir: Path, plan: Plan, log: Callable[[str], None] = print, trust: Iterable[str] = (),
             threads: int | None = None) -> dict[str, Any]:
    """Make and measure the variants of `plan`; write compress.json. Returns what it writes."""
    plan.check()
    job, base = open_job(Path(run_dir), trust, threads, log)
    job.latency_batch = plan.batch
    with torch_threads(job.threads):
        skipped: list[dict[str, str]] = []
        variants = [measure(job, "original", base, base, job.save("original", base.state_dict()), kind="original")]
        if plan.inductor:
            variants.append(inductor_variant(job, "original", base, base, variants[0]["file"]))
        pruned = structured_variants(job, base, plan, variants, skipped)
        variants += unstructured_variants(job, base, plan)
        variants += quantized_variants(job, base, plan, skipped)
        if plan.half:
            for name, dtype in HALF.items():
                model = Cast(copy.deepcopy(base), dtype)
                variants.append(measure(job, name, model, base, job.save(name, model.state_dict()), kind="half"))
        if plan.onnx:
            variants += [onnx_variant(job, name, model) for name, model in [("original", base), *pruned]]
    for v in variants:
        v["delta"] = v[job.metric] - variants[0][job.metric]
    result = {"run_dir": str(run_dir), "metric": job.metric, "device": "cpu", "threads": job.threads,
              "latency_method": LATENCY_METHOD, "plan": asdict(plan), "variants": variants, "skipped": skipped,
              "pareto": pareto_names(variants, job.metric)}
    rundir.write_json(job.folder.compress_report, result)
    return result


def structured_variants(job: Job, base: nn.Module, plan: Plan, variants: list[dict[str, Any]],
                        skipped: list[dict[str, str]]) -> list[tuple[str, nn.Module]]:
    """Structured pruning at each target, appended to `variants`; returns the (name, model) pairs."""
    if not plan.prune:
        return []
    try:
        prune.check_structured(job.cfg.model)
    except DlrunError as why:
        job.log(f"pruned: skipped: {why}")
        skipped.append({"variant": "pruned", "reason": str(why)})
        return []
    tune = (lambda m: finetune(m, job.data, job.cfg, plan.finetune_epochs)) if plan.finetune_epochs else None
    out = []
    for target in plan.prune:
        name = f"pruned-{plan.by}-{target:g}"
        model = prune.structured(base, job.shape, target, plan.by, plan.scope, plan.importance, plan.steps, tune,
                                 lambda m: taylor_gradients(m, job))
        model_cfg = prune.rebuilt_config(model, job.cfg.model)
        file = job.save(name, model.state_dict(), model_cfg)
        variants.append(measure(job, name, model.eval(), model, file, kind="structured", target=target, by=plan.by,
                                scope=plan.scope, importance=plan.importance, steps=plan.steps,
                                finetune_epochs=plan.finetune_epochs, widths=widths_of(model_cfg)))
        out.append((name, model))
    return out


def widths_of(model_cfg: dict[str, Any]) -> dict[str, Any]:
    if model_cfg.get("blocks"):
        return {"blocks": [b["channels"] for b in model_cfg["blocks"]], "hidden": model_cfg.get("hidden")}
    return {k: model_cfg[k] for k in ("channels", "hidden") if k in model_cfg}


def taylor_gradients(model: nn.Module, job: Job) -> None:
    """Gradients of the training loss on the first training batches (Taylor importance), in eval mode
    (batch-norm statistics untouched)."""
    model.eval().zero_grad(set_to_none=True)
    for (x, y) in islice(job.data.splits["train"].batches(job.cfg.trainer.batch_size), 4):
        loss_and_score(model(x), y, job.task)[0].backward()


def unstructured_variants(job: Job, base: nn.Module, plan: Plan) -> list[dict[str, Any]]:
    """Magnitude pruning to each sparsity (zeros in dense tensors: the size compresses, FLOPs stay)."""
    out = []
    for sparsity in plan.sparsity:
        model = copy.deepcopy(base)
        targets = prune.prune_globally(model, sparsity)
        if plan.finetune_epochs:
            finetune(model, job.data, job.cfg, plan.finetune_epochs)
        prune.make_permanent(targets)
        name, state = f"sparse-{sparsity:g}", model.state_dict()
        out.append(measure(job, name, model.eval(), model, job.save(name, state), kind="unstructured",
                           sparsity=prune.sparsity_of(targets), finetune_epochs=plan.finetune_epochs,
                           compressed_mb=serialized_mb(state)[1]))
    return out


def quantized_variants(job: Job, base: nn.Module, plan: Plan, skipped: list[dict[str, str]]) -> list[dict[str, Any]]:
    out = []
    if "static" in plan.quantize:
        out += static_variants(job, base, plan, skipped)
    if "dynamic" in plan.quantize:
        model = dynamic_int8(copy.deepcopy(base))
        out.append(measure(job, "int8-dynamic", model, base, job.save("int8-dynamic", model.state_dict()),
                           kind="int8-dynamic"))
    return out


def static_variants(job: Job, base: nn.Module, plan: Plan, skipped: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Static int8 (PT2E), saved as a torch.export archive (variants/int8-static.pt2), timed eager and,
    with `plan.inductor`, compiled (where its int8 kernels are used). What torch.export, the quantizer
    or inductor cannot take (a recurrent model; inductor errors) is skipped with the reason."""
    out = []
    try:
        batches = job.calibration()[: plan.calibration_batches]
        model = static_int8(copy.deepcopy(base), batches, batches[0])
        file = job.folder.variant("int8-static", ".pt2")
        with quiet():
            archive = torch.export.export(model.graph, (batches[0],),
                                          dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
            rundir.atomic_write(file, lambda f: torch.export.save(archive, f))
        out.append(measure(job, "int8-static", model, base, file, kind="int8-static", calibration_batches=len(batches)))
        if plan.inductor:
            out.append(inductor_variant(job, "int8-static", model, base, str(file)))
    except Exception as err:  # torch.export, the quantizer and inductor raise many types
        name = "int8-static+inductor" if out else "int8-static"
        why = f"{name} failed for this model: {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
        job.log(f"{name}: skipped: {why}")
        skipped.append({"variant": name, "reason": why})
    return out


def inductor_variant(job: Job, name: str, model: nn.Module, source: nn.Module, file: str) -> dict[str, Any]:
    """`model` compiled by inductor with freezing (how PT2E int8 gets its int8 kernels); each batch shape
    is compiled before it is timed (the latency's warm-up), and the compile time is not counted."""
    import torch._inductor.config as inductor

    # each new batch shape compiles, and inductor's lowerings warn about their own tensor copies
    with inductor.patch(freezing=True), torch.no_grad(), quiet("torch.utils.cpp_extension"):
        fast = compiled(model, torch.randn(1, *job.shape))
        record = measure(job, f"{name}+inductor", fast, source, Path(file), kind=f"{name}+inductor")
    record["runtime"] = "inductor"
    return record


def onnx_variant(job: Job, name: str, model: nn.Module) -> dict[str, Any]:
    """`model` exported to variants/<name>.onnx, checked against PyTorch and run by ONNX Runtime."""
    file = job.folder.variant(name, ".onnx")
    export_onnx(model, job.shape, file)
    x = next(iter(job.data.splits["test"].batches(256)))[0]
    checked = check_and_time(model, file, x, job.batch, job.threads)
    record = measure(job, f"{name}+onnxruntime", OnnxRuntime(file, job.threads), model, file, checked["latency"],
                     kind="onnx", max_abs_diff=checked["max_abs_diff"])
    record["runtime"] = "onnxruntime"
    return record


def pareto_names(variants: list[dict[str, Any]], metric: str) -> list[str]:
    """The variants no other beats on both the score and the full-batch median latency."""
    higher = not metric.endswith(("mae", "loss"))
    points = [(list(v["latency_ms"].values())[-1], v[metric] if higher else -v[metric]) for v in variants]
    return [v["name"] for v, (c, s) in zip(variants, points)
            if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for c2, s2 in points)]


def finetune(model: nn.Module, data: Data, cfg, epochs: int) -> None:
    """A short fine-tune with the run's optimizer and the run's loop settings (accumulation, precision,
    clipping, label smoothing, warmup, ...); masks of unstructured pruning keep pruned weights at zero."""
    settings = LoopSettings.of(cfg.trainer, data.spec.task, epochs=epochs, eval_every=epochs, log_every=10**9)
    optimizer = build_optimizer(cfg.optimizer, model, settings.decay_norm_and_bias)
    scaler = torch.amp.GradScaler("cpu") if settings.amp_dtype is torch.float16 else None
    fit(Parts(model, optimizer, scaler=scaler), data, settings, [], lambda state, is_best: None)

