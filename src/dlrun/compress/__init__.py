"""Making a trained model cheaper: structured pruning (prune.py), static and dynamic int8 and half copies
(quantize.py), ONNX export checked with ONNX Runtime (export.py). The `dlrun-compress` command is
dlrun/tools/compress.py (and tools/variants.py). Torch-free here: the command checks its `Plan` before
anything heavy is imported."""

from dataclasses import dataclass, field

from dlrun.errors import DlrunError

BY = ("params", "flops")  # what a structured pruning target counts
SCOPES = ("global", "uniform")  # one ranking of channels over all layers, or the same share in each layer
IMPORTANCE = ("magnitude", "taylor")  # L2 norm of a channel's weights, or |weight * gradient| (Molchanov 2019)
QUANTIZE = ("dynamic", "static")  # int8 methods


@dataclass
class Plan:
    """Which variants to make (the command's options)."""

    prune: list[float] = field(default_factory=lambda: [0.5])  # structured: share of the cost removed
    by: str = "flops"  # what that share counts: params or flops
    scope: str = "global"  # global (one ranking over all layers) or uniform (the same share per layer)
    importance: str = "magnitude"  # or taylor
    steps: int = 1  # prune in this many steps, fine-tuning after each
    finetune_epochs: int = 10  # after each pruning step, through the run's own loop (0: none)
    sparsity: list[float] = field(default_factory=list)  # unstructured magnitude pruning (zeros only)
    quantize: list[str] = field(default_factory=lambda: list(QUANTIZE))
    half: bool = True
    onnx: bool = True
    inductor: bool = False  # also time the original and static int8 compiled by inductor
    calibration_batches: int = 8
    batch: int | None = None  # the full batch latency is measured at; None: the run's trainer.batch_size

    def check(self) -> None:
        """One line naming the option and what is allowed, before anything is read or written."""
        for name, value, allowed in (("--prune-by", self.by, BY), ("--scope", self.scope, SCOPES),
                                     ("--importance", self.importance, IMPORTANCE)):
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
                                 ("--calibration-batches", self.calibration_batches, 1),
                                 ("--batch", 1 if self.batch is None else self.batch, 1)):
            if value < low:
                raise DlrunError(f"{name} {value} is invalid: must be >= {low}")
