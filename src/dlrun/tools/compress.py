"""`dlrun-compress <run folder>`: cheaper variants of a run's best model, every one measured the same way
on the CPU.

Variants: structured pruning (Torch-Pruning: whole channels and neurons removed, to a target share of
the parameters or FLOPs, optionally in steps with fine-tuning through the run's own training loop),
static int8 (PT2E, calibrated on training batches) and dynamic int8, bf16/fp16 copies, the ONNX export
run by ONNX Runtime, and (optionally) unstructured magnitude pruning, which only writes zeros: the
FLOPs and the latency stay. Each variant gets the test score and its change, parameters, FLOPs per
sample, file size and the median latency at batch 1 and at a full batch (dlrun.cost.time_calls, the
thread count recorded). Results go to <run>/compress.json and a table; files to <run>/variants/.
The work is in tools/variants.py, imported once the options are checked.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dlrun.compress import Plan
from dlrun.errors import DlrunError, require_extra

# What dlrun-compress imports beyond dlrun's core (the `compress` extra): Torch-Pruning, torchao (static
# int8), the ONNX exporter's onnx and onnxscript, and ONNX Runtime.
EXTRA_MODULES = ("torch_pruning", "torchao", "onnx", "onnxscript", "onnxruntime")


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from dlrun.sinks import full_batch

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


def numbers(text: str, option: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"{PROG}: error: {option} {text!r}: comma-separated numbers") from None


PROG = "dlrun-compress"


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("run_dir", type=Path, help="a finished run folder (with its best checkpoint)")
    add("--prune", default="0.5", help="structured pruning: comma-separated shares of the cost to remove, each in "
                                       "(0, 1) ('' for none)")
    add("--prune-by", default="flops", help="what --prune counts: flops or params")
    add("--scope", default="global", help="global (one ranking over all layers) or uniform (the same share per layer)")
    add("--importance", default="magnitude", help="channel importance: magnitude or taylor")
    add("--steps", type=int, default=1, help="prune in this many steps, fine-tuning after each")
    add("--finetune-epochs", type=int, default=Plan.finetune_epochs,
        help="fine-tune each pruned model this many epochs with the run's own loop and settings (default: "
             "%(default)s; 0: none, and a pruned model then loses accuracy)")
    add("--sparsity", default="", help="unstructured magnitude pruning (zeros only: no fewer FLOPs), e.g. 0.5,0.9")
    add("--quantize", default="dynamic,static", help="int8 methods: dynamic (Linear/LSTM/GRU), static (PT2E, "
                                                     "calibrated; convolutions too); '' for none")
    add("--no-quantize", action="store_true", help="no int8 variants (as --quantize '')")
    add("--calibration-batches", type=int, default=8, help="training batches static int8 calibrates on")
    add("--no-half", action="store_true", help="skip the bf16/fp16 copies")
    add("--no-onnx", action="store_true", help="skip the ONNX export and ONNX Runtime")
    add("--inductor", action="store_true", help="also time the original and static int8 compiled by inductor "
                                                 "(static int8 is fast only there; compiling takes seconds)")
    add("--batch", type=int, default=None, help="the full batch latency is measured at (default: the run's "
                                                "trainer.batch_size; at most 256 either way)")
    add("--threads", type=int, default=0,
        help="CPU threads for everything measured (0: the run's device.threads, else torch's default)")
    add("--trust", action="append", default=[], metavar="TARGET",
        help="a class or function outside dlrun that the run's checkpoint names (e.g. a model=custom model) and "
             "that you trust to run; repeat for several")
    args = parser.parse_args(argv)
    plan = Plan(prune=numbers(args.prune, "--prune"), by=args.prune_by, scope=args.scope,
                importance=args.importance, steps=args.steps, finetune_epochs=args.finetune_epochs,
                sparsity=numbers(args.sparsity, "--sparsity"),
                quantize=[] if args.no_quantize else [q.strip() for q in args.quantize.split(",") if q.strip()],
                half=not args.no_half, onnx=not args.no_onnx, inductor=args.inductor,
                calibration_batches=args.calibration_batches, batch=args.batch)
    return args, plan


def main(argv: list[str] | None = None) -> None:
    args, plan = parse(argv)
    try:
        plan.check()  # options are checked before anything heavy is imported
        if args.threads < 0:
            raise DlrunError(f"--threads {args.threads} is invalid: must be >= 0")
        require_extra("compress", EXTRA_MODULES, PROG)
        if args.trust:
            from dlrun.config.targets import import_user_code

            import_user_code()
        from dlrun.tools.variants import compress

        result = compress(args.run_dir, plan, log=print, trust=args.trust, threads=args.threads)
    except DlrunError as err:
        raise SystemExit(f"{PROG}: error: {err}") from None
    print_table(result)
    from dlrun.rundir import RunDir

    print(f"wrote {RunDir(args.run_dir).compress_report} and {RunDir(args.run_dir).variants}")
