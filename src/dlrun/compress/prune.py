"""Pruning. Structured: Torch-Pruning's dependency graph removes whole channels and neurons (and what
depends on them: batch-norm entries, the next layer's inputs), so parameters, FLOPs and latency drop;
the result is a plain dlrun model of smaller widths, saved as a config plus a state dict and rebuilt
without Torch-Pruning. Unstructured (the earlier option): zeros in dense tensors, no fewer FLOPs.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import prune as torch_prune

from dlrun.cost import count_parameters, flops_per_sample
from dlrun.errors import DlrunError

STRUCTURED = {"dlrun.models.CNN", "dlrun.models.MLP"}
CONV_OR_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Linear)
GradFn = Callable[[nn.Module], None]  # fills a model's .grad from a few training batches (Taylor importance)


def check_structured(model_cfg: Any) -> None:
    """Structured pruning needs a model that dlrun can rebuild at the pruned widths: model=cnn or mlp."""
    target = model_cfg.get("_target_")
    if target == "dlrun.models.RNN":
        raise DlrunError("structured pruning does not support model=rnn: Torch-Pruning 1.6 prunes only single-layer "
                         "nn.LSTM hidden units and no GRU/RNN cells; use --quantize dynamic for recurrent models")
    if target not in STRUCTURED:
        raise DlrunError(f"structured pruning supports model=cnn and model=mlp (widths dlrun can rebuild), "
                         f"not {target}")


def cost_of(model: nn.Module, by: str, input_shape: Sequence[int]) -> int:
    """Parameters, or forward FLOPs per sample (the counts the compress table shows)."""
    if by == "params":
        return count_parameters(model)["total"]
    return flops_per_sample(model, input_shape, torch.device("cpu"))


def prune_channels(model: nn.Module, input_shape: Sequence[int], ratio: float, scope: str, importance: str,
                   grad_fn: GradFn | None = None) -> nn.Module:
    """A copy of `model` with `ratio` of the channels/neurons of every Conv/Linear layer but the output
    layer removed (`scope=uniform`: the same share in each layer; `global`: the least important
    channels of all layers, by one ranking)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    if importance == "taylor":
        grad_fn(model)  # type: ignore[misc]
    imp = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=2)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    Pruner = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner  # MetaPruner before Torch-Pruning 1.5
    pruner = Pruner(model, torch.zeros(1, *input_shape), importance=imp, pruning_ratio=ratio,
                    global_pruning=scope == "global", ignored_layers=[last], max_pruning_ratio=0.95)
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def prune_to(model: nn.Module, input_shape: Sequence[int], keep: float, by: str, scope: str, importance: str,
             reference: int, grad_fn: GradFn | None = None) -> nn.Module:
    """The least-pruned copy of `model` whose cost (`by`) is at most `keep` times `reference`: Torch-Pruning's
    channel ratio is found by bisection, since parameters and FLOPs fall faster than the channel count."""
    low, high, found = 0.0, 0.95, None
    for _ in range(14):
        mid = (low + high) / 2
        pruned = prune_channels(model, input_shape, mid, scope, importance, grad_fn)
        if cost_of(pruned, by, input_shape) <= keep * reference:
            high, found = mid, pruned
        else:
            low = mid
    if found is None:
        raise DlrunError("pruning cannot remove that much: at most 95% of each layer's channels go")
    return found


def structured(model: nn.Module, input_shape: Sequence[int], target: float, by: str, scope: str, importance: str,
               steps: int = 1, finetune: Callable[[nn.Module], None] | None = None,
               grad_fn: GradFn | None = None) -> nn.Module:
    """Remove `target` of the model's cost (`by`: parameters or FLOPs), in `steps` equal steps, each
    followed by `finetune(model)` when given (the run's own loop, see tools/compress.py)."""
    reference = cost_of(model, by, input_shape)
    for step in range(1, steps + 1):
        model = prune_to(model, input_shape, 1 - target * step / steps, by, scope, importance, reference, grad_fn)
        if finetune is not None:
            finetune(model)
    return model


def rebuilt_config(pruned: nn.Module, model_cfg: Any) -> dict[str, Any]:
    """The model config whose widths are the pruned model's: the same class, rebuilt with fewer channels
    (`channels` or `blocks[i].channels`) and hidden units (`hidden`)."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True)
    layers = [m for m in pruned.modules() if isinstance(m, CONV_OR_LINEAR)]
    convs = [m.out_channels for m in layers if not isinstance(m, nn.Linear)]
    hidden = [m.out_features for m in layers if isinstance(m, nn.Linear)][:-1]
    if cfg["_target_"] == "dlrun.models.MLP":
        return {**cfg, "hidden": hidden}
    if cfg.get("blocks"):
        cfg["blocks"] = [{**block, "channels": width} for block, width in zip(cfg["blocks"], convs)]
    else:
        cfg["channels"] = convs
    cfg["hidden"] = (hidden[0] if hidden else 0) if isinstance(cfg.get("hidden", 128), int) else hidden
    return cfg


# ------------------------------------------------------------------ unstructured (zeros, same FLOPs)


def prune_globally(model: nn.Module, sparsity: float) -> list[tuple[nn.Module, str]]:
    """Zero the `sparsity` fraction of smallest-magnitude weights across all Linear/Conv layers."""
    targets = [(m, "weight") for m in model.modules() if isinstance(m, CONV_OR_LINEAR)]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    return targets


def sparsity_of(targets: list[tuple[nn.Module, str]]) -> float:
    weights = [getattr(m, name) for m, name in targets]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def make_permanent(targets: list[tuple[nn.Module, str]]) -> None:
    """The masks folded into plain weights (the zeros stay)."""
    for module, name in targets:
        torch_prune.remove(module, name)
