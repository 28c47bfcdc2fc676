"""`dlrun-compress <run folder>` (also `dlrun-optimize`, its earlier name): cheaper variants of a run's
best model, every one measured the same way on the CPU.

Variants: structured pruning (Torch-Pruning: whole channels and neurons removed, to a target share of
the parameters or FLOPs, optionally in steps with fine-tuning through the run's own training loop),
static int8 (PT2E, calibrated on training batches) and dynamic int8, bf16/fp16 copies, the ONNX export
run by ONNX Runtime, and (optionally) unstructured magnitude pruning, which only writes zeros: the
FLOPs and the latency stay. Each variant gets the test score and its change, parameters, FLOPs per
sample, file size and the median latency at batch 1 and at a full batch (dlrun.cost.time_calls, the
thread count recorded). Results go to <run>/compress.json and a table; files to <run>/variants/.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import zlib
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from dlrun import checkpoint, rundir
from dlrun.compress import prune
from dlrun.compress.export import check_and_time, export_onnx, session
from dlrun.compress.quantize import HALF, Cast, compiled, dynamic_int8, static_int8
from dlrun.config.schema import score_name
from dlrun.config.targets import import_user_code
from dlrun.cost import LATENCY_METHOD, flops_per_sample, latency_entries, latency_pair, quiet, torch_threads
from dlrun.data import Data, DataSpec, build_dataset
from dlrun.errors import DlrunError
from dlrun.models import build_model, count_parameters
from dlrun.sinks import full_batch
from dlrun.optim import build_optimizer
from dlrun.rundir import RunDir
from dlrun.train import LoopSettings, Parts, evaluate, fit, loss_and_score

CPU = torch.device("cpu")
QUANTIZE = ("dynamic", "static")
quantized = dynamic_int8  # the earlier name


@dataclass
class Plan:
    """Which variants to make (the command's options)."""

    prune: list[float] = field(default_factory=lambda: [0.5])  # structured: share of the cost removed
    by: str = "flops"  # what that share counts: params or flops
    scope: str = "global"  # global (one ranking over all layers) or uniform (the same share per layer)
    importance: str = "magnitude"  # or taylor
    steps: int = 1  # prune in this many steps, fine-tuning after each
    finetune_epochs: int = 0
    sparsity: list[float] = field(default_factory=list)  # unstructured magnitude pruning (zeros only)
    quantize: list[str] = field(default_factory=lambda: list(QUANTIZE))
    half: bool = True
    onnx: bool = True
    inductor: bool = False  # also time the original and static int8 compiled by inductor
    calibration_batches: int = 8
    batch: int = 0  # the full batch latency is measured at; 0 = the run's trainer.batch_size

    def check(self) -> None:
        """One line naming the option and what is allowed, before anything is read or written."""
        for name, value, allowed in (("--prune-by", self.by, prune.BY), ("--scope", self.scope, ("global", "uniform")),
                                     ("--importance", self.importance, prune.IMPORTANCE)):
            if value not in allowed:
                raise DlrunError(f"{name} {value!r} is invalid: allowed: {', '.join(allowed)}")
        for method in self.quantize:
            if method not in QUANTIZE:
                raise DlrunError(f"--quantize {method!r} is invalid: allowed: {', '.join(QUANTIZE)}")
        if any(not 0 < r < 1 for r in self.prune):
            raise DlrunError(f"--prune {','.join(f'{r:g}' for r in self.prune)} is invalid: each must be in (0, 1)")
        if any(not 0 <= s < 1 for s in self.sparsity):
            raise DlrunError(f"--sparsity {','.join(f'{s:g}' for s in self.sparsity)} is invalid: each must be in [0, 1)")
        for name, value, low in (("--steps", self.steps, 1), ("--finetune-epochs", self.finetune_epochs, 0),
                                 ("--calibration-batches", self.calibration_batches, 1), ("--batch", self.batch, 0)):
            if value < low:
                raise DlrunError(f"{name} {value} is invalid: must be >= {low}")


@dataclass
class Job:
    """The run being compressed: its folder, best checkpoint, config and data, and the thread count."""

    folder: RunDir
    best: dict[str, Any]
    cfg: Any
    data: Data
    threads: int
    log: Callable[[str], None]
    latency_batch: int = 0

    task = property(lambda self: self.data.spec.task)
    metric = property(lambda self: f"test/{score_name(self.data.spec.task)}")
    shape = property(lambda self: tuple(self.data.spec.input_shape))
    batch = property(lambda self: self.latency_batch or self.cfg.trainer.batch_size)

    def save(self, name: str, state: dict[str, Any], model_cfg: Any = None, **extra: Any) -> Path:
        """variants/<name>.pt: weights and what `load_variant` rebuilds them with (the model config)."""
        config = {**self.best["config"], "model": model_cfg} if model_cfg is not None else self.best["config"]
        path = self.folder.variant(name)
        checkpoint.save({"model": state, "variant": name, "config": config, "input_shape": list(self.shape),
                         "num_outputs": self.data.spec.num_outputs, "task": self.task, **extra}, path)
        return path

    def calibration(self) -> list[torch.Tensor]:
        """The first training batches, in order (static int8's calibration and Taylor importance's gradients)."""
        return [x for x, _ in islice(self.data.splits["train"].batches(self.cfg.trainer.batch_size), 8)]


def load_variant(path: Path, trust: Iterable[str] = ()) -> nn.Module:
    """A saved .pt variant as a ready model (on the CPU): the run's model (at its pruned widths for a
    structured-pruned one), transformed as it was, with its weights. Torch-Pruning is not needed.
    Its config may name only dlrun's builders, or what is in `trust`."""
    saved = checkpoint.load(path)
    config = checkpoint.config_of(saved, path, trust, consent="load_variant(path, trust=['{target}'])")
    try:
        spec = DataSpec(tuple(saved["input_shape"]), saved["num_outputs"], saved["task"])
        variant = saved["variant"]
    except (KeyError, TypeError):
        raise DlrunError(f"{path} is not a variant written by dlrun-compress") from None
    model = build_model(config.model, spec)
    if variant == "int8-dynamic":
        model = dynamic_int8(model)
    elif variant in HALF:
        model = Cast(model, HALF[variant])
        checkpoint.load_weights(model.model, saved["model"], path)
        return model.eval()
    checkpoint.load_weights(model, saved["model"], path)
    return model.eval()


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
    folder = RunDir(run_dir)
    best = checkpoint.load(folder.best)
    cfg = checkpoint.config_of(best, folder.best, trust)
    torch.manual_seed(cfg.trainer.seed)
    data = build_dataset(cfg.dataset, CPU)
    model = build_model(cfg.model, data.spec)
    checkpoint.load_weights(model, best["model"], folder.best)
    threads = threads or cfg.device.get("threads") or torch.get_num_threads()
    return Job(folder, best, cfg, data, threads, log), model.eval()


def compress(run_dir: Path, sparsities: Iterable[float] = (), finetune_epochs: int = 0, half: bool = True,
             quantize: bool = True, log: Callable[[str], None] = print, trust: Iterable[str] = (),
             threads: int | None = None, plan: Plan | None = None) -> dict[str, Any]:
    """Make and measure the variants of `plan` (without one: the earlier options, unstructured pruning at
    `sparsities`, dynamic int8 and half copies); write compress.json. Returns what it writes."""
    plan = plan or Plan(prune=[], sparsity=list(sparsities), finetune_epochs=finetune_epochs, half=half,
                        quantize=["dynamic"] if quantize else [], onnx=False)
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
                variants.append(measure(job, name, model, base, job.save(name, model.model.state_dict()), kind="half"))
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
        file.parent.mkdir(parents=True, exist_ok=True)
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
    file.parent.mkdir(parents=True, exist_ok=True)
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


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    metric, variants = result["metric"], result["variants"]
    full = full_batch(variants[0]["latency_ms"]).split("_")[1]
    table = Table(title=f"dlrun-compress: {result['run_dir']} (CPU, {result['threads']} threads; latency: median "
                        "ms per call, ± IQR)", header_style="bold")
    for column in ("variant", "runtime", metric, "change", "params", "FLOPs/sample", "file MiB", "batch 1 ms",
                   f"batch {full} ms"):
        table.add_column(column, justify="left" if column in ("variant", "runtime") else "right")
    for v in variants:
        lat = [v["latency"][k] for k in v["latency_ms"]]
        table.add_row(v["name"] + (" *" if v["name"] in result["pareto"] else ""), v["runtime"], f"{v[metric]:.4f}",
                      f"{v['delta']:+.4f}", f"{v['parameters']:,}", f"{v['flops_per_sample']:,}", f"{v['file_mb']:.3f}",
                      *(f"{x['median_ms']:.3f} ± {x['iqr_ms']:.3f}" for x in lat))
    console = Console()
    (console if console.is_terminal else Console(width=160)).print(table)
    print("* on the Pareto front (score against the full-batch latency)")
    for v in variants:
        if "max_abs_diff" in v:
            print(f"{v['name']}: max |ONNX Runtime - PyTorch| = {v['max_abs_diff']:.2e}")
    for s in result["skipped"]:
        print(f"{s['variant']}: skipped: {s['reason']}")


def numbers(text: str, option: str, prog: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"{prog}: error: {option} {text!r}: comma-separated numbers") from None


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Plan, str]:
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name if argv is None else "dlrun-compress",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("run_dir", type=Path, help="a finished run folder (with its best checkpoint)")
    add("--prune", default="0.5", help="structured pruning: comma-separated shares of the cost to remove, each in "
                                       "(0, 1) ('' for none)")
    add("--prune-by", default="flops", help="what --prune counts: flops or params")
    add("--scope", default="global", help="global (one ranking over all layers) or uniform (the same share per layer)")
    add("--importance", default="magnitude", help="channel importance: magnitude or taylor")
    add("--steps", type=int, default=1, help="prune in this many steps, fine-tuning after each")
    add("--finetune-epochs", type=int, default=0, help="fine-tune each pruned model this long with the run's loop")
    add("--sparsity", default="", help="unstructured magnitude pruning (zeros only: no fewer FLOPs), e.g. 0.5,0.9")
    add("--quantize", default="dynamic,static", help="int8 methods: dynamic (Linear/LSTM/GRU), static (PT2E, "
                                                     "calibrated; convolutions too); '' for none")
    add("--no-quantize", action="store_true", help="no int8 variants (as --quantize '')")
    add("--calibration-batches", type=int, default=8, help="training batches static int8 calibrates on")
    add("--no-half", action="store_true", help="skip the bf16/fp16 copies")
    add("--no-onnx", action="store_true", help="skip the ONNX export and ONNX Runtime")
    add("--inductor", action="store_true", help="also time the original and static int8 compiled by inductor "
                                                 "(static int8 is fast only there; compiling takes seconds)")
    add("--batch", type=int, default=0, help="the full batch latency is measured at (0: the run's trainer.batch_size;"
                                             " at most 256 either way)")
    add("--threads", type=int, default=0,
        help="CPU threads for everything measured (0: the run's device.threads, else torch's default)")
    add("--trust", action="append", default=[], metavar="TARGET",
        help="a class or function outside dlrun that the run's checkpoint names (e.g. a model=custom model) and "
             "that you trust to run; repeat for several")
    args = parser.parse_args(argv)
    plan = Plan(prune=numbers(args.prune, "--prune", parser.prog), by=args.prune_by, scope=args.scope,
                importance=args.importance, steps=args.steps, finetune_epochs=args.finetune_epochs,
                sparsity=numbers(args.sparsity, "--sparsity", parser.prog),
                quantize=[] if args.no_quantize else [q.strip() for q in args.quantize.split(",") if q.strip()],
                half=not args.no_half, onnx=not args.no_onnx, inductor=args.inductor,
                calibration_batches=args.calibration_batches, batch=args.batch)
    return args, plan, parser.prog


def main(argv: list[str] | None = None) -> None:
    args, plan, prog = parse(argv)
    try:
        plan.check()
        if args.threads < 0:
            raise DlrunError(f"--threads {args.threads} is invalid: must be >= 0")
        if args.trust:
            import_user_code()
        result = compress(args.run_dir, log=print, trust=args.trust, threads=args.threads, plan=plan)
    except DlrunError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
    print_table(result)
    print(f"wrote {RunDir(args.run_dir).compress_report} and {RunDir(args.run_dir).variants}")
