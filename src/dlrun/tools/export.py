"""`dlrun-export <run folder>`: the run's model as a file that runs without dlrun.

    dlrun-export RUN                                   ONNX (ONNX Runtime runs it), into RUN/export/
    dlrun-export RUN --format torchscript              TorchScript (torch.jit.load)
    dlrun-export RUN --format pt2 --checkpoint last    a torch.export archive (torch.export.load)
    dlrun-export RUN --out /srv/models/digits.onnx     somewhere else

The file takes what the model takes, a float32 batch (N, *input shape) normalised with the training split's
mean and std, and gives the logits (or the regression outputs); the batch size is free. Beside it,
<file>.json says so: input shape, mean, std, class names, and the check. Before it is kept, the file is run
by its own runtime on the run's whole test split, and its outputs must equal PyTorch's to float rounding;
the largest difference and the share of equal predictions are printed and saved.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dlrun.tools import run_checkpoint

PROG = "dlrun-export"
FORMATS = ("onnx", "torchscript", "pt2")
CHECKPOINTS = ("best", "last")
# outputs further from PyTorch's than this (relative to their largest magnitude) are not float rounding
TOLERANCE = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (with checkpoints/best.pt or last.pt)")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="onnx (default), torchscript or pt2")
    parser.add_argument("--checkpoint", default="best", choices=CHECKPOINTS, help="best (default) or last")
    parser.add_argument("--out", type=Path, help="the file to write (default: RUN/export/model.<format's suffix>)")
    parser.add_argument("--trust", action="append", default=[], metavar="TARGET",
                        help="a class outside dlrun that the checkpoint names (a model=custom model) and that you "
                             "trust to run; repeat for several")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from dlrun.errors import DlrunError

    args = parse_args(argv)  # before anything heavy is imported
    try:
        record = export(args)
    except DlrunError as err:
        raise SystemExit(f"{PROG}: error: {err}") from None
    check = record["check"]
    print(f"wrote {record['file']} ({record['format']}, {record['checkpoint']} checkpoint, input (N, "
          f"{', '.join(map(str, record['input']['shape'][1:]))}) float32, normalised: see {record['file']}.json)")
    same = f", the same prediction for {check['same_predictions']:.2%}" if "same_predictions" in check else ""
    print(f"checked on the test split ({check['samples']:,} samples): max |{record['format']} - PyTorch| = "
          f"{check['max_abs_diff']:.2e}{same}")


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `main` does; returns what went into the file's .json."""
    from dlrun.errors import require_extra

    if args.format == "onnx":
        require_extra("compress", ("onnx", "onnxscript", "onnxruntime"), f"{PROG} --format onnx")
    folder, checkpoint = run_checkpoint(args.run, args.checkpoint, "export")
    import torch

    import dlrun
    from dlrun.checkpoint import load_model
    from dlrun.compress.export import FORMATS as EXPORTERS, load_exported
    from dlrun.config.targets import import_user_code
    from dlrun.data import build_dataset
    from dlrun.errors import DlrunError
    from dlrun.rundir import write_json

    if args.trust:
        import_user_code()
    model, cfg, data = load_model(checkpoint, args.trust)
    exporter, suffix = EXPORTERS[args.format]
    out = (args.out or folder.exported(suffix)).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(data["input_shape"])
    exporter(model, shape, out)
    test = build_dataset(cfg.dataset, torch.device("cpu")).splits["test"]
    try:
        check = compare(model, load_exported(out, args.format, torch.get_num_threads()), test,
                        cfg.trainer.eval_batch_size, data["task"])
    except DlrunError:
        out.unlink()  # a file that does not compute what the model computes is not kept
        raise
    record = {"file": str(out), "format": args.format, "checkpoint": args.checkpoint, "run_dir": str(folder.path),
              "input": {"name": "x", "shape": ["N", *shape], "dtype": "float32"}, "output": "y",
              "normalise": {"mean": data["mean"], "std": data["std"]}, "task": data["task"],
              "classes": data.get("classes"), "check": check,
              "versions": {"dlrun": dlrun.__version__, "torch": torch.__version__}}
    write_json(out.with_name(out.name + ".json"), record)
    return record


def compare(model, run_exported, split, batch_size: int, task: str) -> dict[str, Any]:
    """The exported file's outputs against PyTorch's on every sample of `split`: the largest absolute difference
    and, for classification, the share of equal predictions. Beyond float rounding it is an error."""
    import numpy as np
    import torch

    from dlrun.errors import DlrunError

    largest = diff = same = 0.0
    with torch.no_grad():
        for x, _ in split.batches(batch_size):
            expected, got = model(x).numpy(), run_exported(x)
            largest = max(largest, float(np.abs(expected).max()))
            diff = max(diff, float(np.abs(got - expected).max()))
            same += float((got.argmax(1) == expected.argmax(1)).sum()) if task == "classification" else 0
    if diff > TOLERANCE * max(1.0, largest):
        raise DlrunError(f"the exported model's outputs differ from PyTorch's by up to {diff:.3g} on the test split "
                         f"(outputs up to {largest:.3g}): more than float rounding; please report it")
    check = {"split": "test", "samples": len(split), "max_abs_diff": diff}
    return {**check, "same_predictions": same / len(split)} if task == "classification" else check
