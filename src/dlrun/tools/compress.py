"""`dlrun-compress <run folder>` (also `dlrun-optimize`, its earlier name): smaller and faster
variants of a run's best model, each re-evaluated.

Variants: global magnitude pruning at the given sparsities (optionally fine-tuned, the pruning
then made permanent), dynamic int8 quantisation of Linear/LSTM/GRU layers, and bf16/fp16
copies. Every variant is evaluated on the run's test split on the CPU (where dynamic int8
quantisation runs), next to the original: score and its change, size, latency. Results go to
<run>/compress.json and a table; each variant's weights to <run>/variants/<name>.pt.
"""

from __future__ import annotations

import argparse
import copy
import sys
import io
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from dlrun import checkpoint, rundir
from dlrun.config.schema import score_name
from dlrun.config.targets import import_user_code
from dlrun.cost import latency_entries, latency_pair
from dlrun.data import Data, DataSpec, build_dataset
from dlrun.errors import DlrunError
from dlrun.models import build_model
from dlrun.optim import build_optimizer
from dlrun.rundir import RunDir
from dlrun.train import LoopSettings, Parts, evaluate, fit

CPU = torch.device("cpu")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


class Cast(nn.Module):
    """Feeds a half-precision model: casts the input to its dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def quantized(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of the Linear, LSTM and GRU layers (CPU)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that quantized tensor types are being phased out
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)


def load_variant(path: Path, trust: Iterable[str] = ()) -> nn.Module:
    """A saved variant as a ready model (on the CPU): the run's model, transformed as it was, with its
    weights. Its config may name only dlrun's builders, or what is in `trust`."""
    saved = checkpoint.load(path)
    config = checkpoint.config_of(saved, path, trust, consent="load_variant(path, trust=['{target}'])")
    try:
        spec = DataSpec(tuple(saved["input_shape"]), saved["num_outputs"], saved["task"])
        variant = saved["variant"]
    except (KeyError, TypeError):
        raise DlrunError(f"{path} is not a variant written by dlrun-compress") from None
    model = build_model(config.model, spec)
    if variant == "int8-dynamic":
        model = quantized(model)
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


def prune_globally(model: nn.Module, sparsity: float) -> list[tuple[nn.Module, str]]:
    """Zero the `sparsity` fraction of smallest-magnitude weights across all Linear/Conv layers."""
    targets = [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    return targets


def sparsity_of(targets: list[tuple[nn.Module, str]]) -> float:
    weights = [getattr(m, name) for m, name in targets]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def compress(run_dir: Path, sparsities: list[float], finetune_epochs: int, half: bool, quantize: bool,
             log: Callable[[str], None] = print, trust: Iterable[str] = (), threads: int | None = None) -> dict[str, Any]:
    folder = RunDir(run_dir)
    best = checkpoint.load(folder.best)
    cfg = checkpoint.config_of(best, folder.best, trust)
    threads = threads or cfg.device.get("threads") or torch.get_num_threads()
    torch.manual_seed(cfg.trainer.seed)
    data = build_dataset(cfg.dataset, CPU)
    task = data.spec.task
    metric = f"test/{score_name(task)}"
    base_model = build_model(cfg.model, data.spec)
    checkpoint.load_weights(base_model, best["model"], folder.best)
    shape, batch = data.spec.input_shape, cfg.trainer.batch_size

    def measure(name: str, model: nn.Module, state: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        scores = evaluate(model, data.splits["test"], cfg.trainer.eval_batch_size, task=task)
        size, compressed = serialized_mb(state)
        out_file = folder.variant(name)
        checkpoint.save({"model": state, "variant": name, "config": best["config"], "input_shape": list(shape),
                         "num_outputs": data.spec.num_outputs, "task": task, **extra}, out_file)
        log(f"{name}: {metric} {scores[score_name(task)]:.4f}")
        return {"name": name, metric: scores[score_name(task)], "test/loss": scores["loss"], "size_mb": size,
                "compressed_mb": compressed,
                **latency_entries(latency_pair(model, shape, batch, CPU, threads)),
                "file": str(out_file), **extra}

    variants = [measure("original", base_model, base_model.state_dict(), {})]
    for sparsity in sparsities:
        model = copy.deepcopy(base_model)
        targets = prune_globally(model, sparsity)
        if finetune_epochs:
            finetune(model, data, cfg, finetune_epochs)
        for module, name in targets:
            prune.remove(module, name)  # permanent: the zeros are now plain weights
        variants.append(measure(f"pruned-{sparsity:g}", model, model.state_dict(),
                                {"sparsity": sparsity_of(targets), "finetune_epochs": finetune_epochs}))
    if quantize:
        qmodel = quantized(copy.deepcopy(base_model))
        variants.append(measure("int8-dynamic", qmodel, qmodel.state_dict(), {}))
    if half:
        for name, dtype in HALF.items():
            model = Cast(copy.deepcopy(base_model), dtype)
            variants.append(measure(name, model, model.model.state_dict(), {}))
    base = variants[0][metric]
    for v in variants:
        v["delta"] = v[metric] - base
    result = {"run_dir": str(run_dir), "metric": metric, "device": "cpu", "threads": threads,
              "variants": variants}
    rundir.write_json(folder.compress_report, result)
    return result


def finetune(model: nn.Module, data: Data, cfg, epochs: int) -> None:
    """A short fine-tune of a pruned model with the run's optimizer and the run's loop settings
    (accumulation, precision, clipping, label smoothing, warmup, ...); the masks keep pruned
    weights at zero."""
    settings = LoopSettings.of(cfg.trainer, data.spec.task, epochs=epochs, eval_every=epochs, log_every=10**9)
    optimizer = build_optimizer(cfg.optimizer, model, settings.decay_norm_and_bias)
    scaler = torch.amp.GradScaler("cpu") if settings.amp_dtype is torch.float16 else None
    fit(Parts(model, optimizer, scaler=scaler), data, settings, [], lambda state, is_best: None)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = result["metric"]
    table = Table(title=f"dlrun-compress: {result['run_dir']} (on the CPU)", header_style="bold")
    for column in ("variant", metric, "change", "size MiB", "zlib MiB", "latency b1 ms", "latency batch ms", "sparsity"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for v in result["variants"]:
        lat = list(v["latency_ms"].values())
        table.add_row(v["name"], f"{v[metric]:.4f}", f"{v['delta']:+.4f}", f"{v['size_mb']:.3f}",
                      f"{v['compressed_mb']:.3f}", f"{lat[0]:.3f}", f"{lat[1]:.3f}",
                      f"{v['sparsity']:.2f}" if "sparsity" in v else "-")
    console = Console()
    (console if console.is_terminal else Console(width=140)).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name if argv is None else "dlrun-compress",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run folder (with its best checkpoint)")
    parser.add_argument("--sparsity", default="0.5,0.8,0.9", help="comma-separated pruning sparsities ('' for none)")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune each pruned model this long")
    parser.add_argument("--no-quantize", action="store_true", help="skip dynamic int8 quantisation")
    parser.add_argument("--no-half", action="store_true", help="skip the bf16/fp16 copies")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for evaluation and latency (0: the run's device.threads, else torch's default)")
    parser.add_argument("--trust", action="append", default=[], metavar="TARGET",
                        help="a class or function outside dlrun that the run's checkpoint names (e.g. a model=custom "
                             "model) and that you trust to run; repeat for several")
    args = parser.parse_args(argv)
    try:
        sparsities = [float(s) for s in args.sparsity.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"{parser.prog}: error: --sparsity {args.sparsity!r}: comma-separated numbers in [0, 1)") from None
    if any(not 0 <= s < 1 for s in sparsities):
        raise SystemExit(f"{parser.prog}: error: --sparsity {args.sparsity!r}: each must be in [0, 1)")
    try:
        if args.trust:
            import_user_code()
        result = compress(args.run_dir, sparsities, args.finetune_epochs, not args.no_half, not args.no_quantize,
                          log=lambda line: None, trust=args.trust, threads=args.threads)
    except DlrunError as err:
        raise SystemExit(f"{parser.prog}: error: {err}") from None
    print_table(result)
    print(f"wrote {RunDir(args.run_dir).compress_report} and {RunDir(args.run_dir).variants}")
