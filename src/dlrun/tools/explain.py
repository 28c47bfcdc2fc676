"""`dlrun-explain`: why did a trained classifier predict what it did?

    dlrun-explain <run folder> [--method integrated_gradients|saliency|occlusion|gradient_shap]
                  [--target predicted|true] [--checkpoint best|last] [--examples N] [--device auto|cpu|cuda]
                  [--trust my_pkg.MyNet]

Rebuilds the run's test split (as `dlrun-predict --evaluate` does), predicts it with the chosen
checkpoint, and attributes the logit of the target class of N examples (by default half the most
confidently wrong ones, the rest correct ones, one class after another) to the input with Captum.
It writes, into the run folder:

    plots/attributions_<method>.png  images: each input and its attribution map over it; signals and
                                     sequences: the signal over a band coloured per step
    plots/misclassified.png          the most confidently wrong test examples, true and predicted labels
    explain.json                     per method: the examples, targets, probabilities, attribution sums
                                     and, for Integrated Gradients, the completeness error

Everything is computed before anything is written: an error leaves the folder as it was. The
checkpoint is opened with dlrun-predict's rules (plain data only; `--trust` for a model=custom
class). Regression runs are refused (there is no class to attribute).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlrun.tools import positive_int, run_checkpoint

METHODS = ("integrated_gradients", "saliency", "occlusion", "gradient_shap")
TARGETS = ("predicted", "true")
CHECKPOINTS = ("best", "last")
DEVICES = ("auto", "cpu", "cuda")
MISCLASSIFIED = 18  # examples in plots/misclassified.png
IG_STEPS = 64  # Integrated Gradients' steps along the path from the baseline
SHAP_BACKGROUND = 32  # training inputs that GradientShap draws its baselines from
SHAP_SAMPLES = 32


def main(argv: list[str] | None = None) -> None:
    from dlrun.errors import DlrunError

    args = parse_args(argv)
    try:
        report = explain(args)
    except DlrunError as err:
        raise SystemExit(f"dlrun-explain: error: {err}") from None
    print(f"{report['method']} of the {report['target']} class, {len(report['examples'])} test examples "
          f"({report['checkpoint']} checkpoint): wrote {', '.join(report['written'])}")
    if "completeness" in report:
        c = report["completeness"]
        print(f"completeness (sum of attributions - logit difference): max |error| {c['max_abs_error']:.2e}, "
              f"{c['max_relative_error']:.2%} of the logit difference at most")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dlrun-explain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (with checkpoints/best.pt or last.pt)")
    parser.add_argument("--method", default="integrated_gradients", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--target", default="predicted", help="attribute the predicted class or the true one")
    parser.add_argument("--checkpoint", default="best", help="best (default) or last")
    parser.add_argument("--examples", type=positive_int, default=8, help="test examples to explain (default 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--trust", action="append", default=[], metavar="TARGET",
                        help="a class outside dlrun that the checkpoint names (a model=custom model) and that you "
                             "trust to run; repeat for several")
    return parser.parse_args(argv)


def check_choices(args: argparse.Namespace) -> None:
    """--method, --target, --checkpoint and --device, each a one-line error naming what is allowed."""
    from dlrun.errors import ConfigError

    for option, allowed in (("method", METHODS), ("target", TARGETS), ("checkpoint", CHECKPOINTS),
                            ("device", DEVICES)):
        value = getattr(args, option)
        if value not in allowed:
            raise ConfigError(f"--{option} {value} is unknown; allowed: {', '.join(allowed)}")


@dataclass
class Predicted:
    """The test split as the model sees it: labels and class probabilities, (N,) and (N, K) on the CPU."""

    y: Any
    probs: Any

    @property
    def predicted(self):
        return self.probs.argmax(dim=1)


def explain(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `main` does; returns what went into explain.json (plus `written`: the files)."""
    from dlrun.errors import require_extra

    check_choices(args)  # the options, the extra and the folder are checked before torch is imported
    require_extra("explain", ("captum",), "dlrun-explain")
    folder, checkpoint = run_checkpoint(args.run, args.checkpoint, "explain")
    import torch

    from dlrun.config.targets import import_user_code
    from dlrun.data import build_dataset

    device = pick_device(args.device)
    if args.trust:
        import_user_code()
    model, cfg, data = load_classifier(checkpoint, args.trust)
    model.to(device)
    splits = build_dataset(cfg.dataset, device).splits
    seen = predict_split(model, splits["test"], cfg.trainer.eval_batch_size)
    chosen = choose_examples(seen, args.examples)
    wrong = most_confidently_wrong(seen, MISCLASSIFIED)
    inputs = inputs_at(splits["test"], chosen + wrong, cfg.trainer.eval_batch_size)
    x = torch.stack([inputs[i] for i in chosen])
    targets = (seen.predicted if args.target == "predicted" else seen.y)[chosen]
    background = training_background(splits["train"], cfg.trainer.eval_batch_size) \
        if args.method == "gradient_shap" else None
    maps, deltas = attribute(model, args.method, x, targets.to(device), background)
    report = describe(args, checkpoint, seen, chosen, targets, maps, deltas, data)
    names = class_names(data)
    report["misclassified"] = [{"index": i, "true": names[int(seen.y[i])], "predicted": names[int(seen.predicted[i])],
                                "p_predicted": _short(seen.probs[i].max())} for i in wrong]
    pictures = draw(folder, args, x, maps, seen, chosen, [inputs[i] for i in wrong], wrong, data)
    report["written"] = [str(p.relative_to(folder.path)) for p in pictures] + [folder.explain_report.name]
    write_report(folder, report)
    return report


def pick_device(name: str):
    import torch

    from dlrun.errors import ConfigError

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch finds no CUDA device; use --device cpu or auto")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def load_classifier(checkpoint: Path, trust: list[str]):
    """The checkpoint's model, loaded as every tool loads one (checked config, weights); a regression
    model is refused."""
    from dlrun.checkpoint import load_model
    from dlrun.errors import ConfigError

    model, cfg, data = load_model(checkpoint, trust)
    if data["task"] != "classification":
        raise ConfigError(f"{checkpoint}: a {data['task']} model ({data['name']}); dlrun-explain attributes "
                          "class predictions, so it needs a classification run")
    return model, cfg, data


def class_names(data: dict[str, Any]) -> list[str]:
    from dlrun.metrics import class_names as names

    return names(data["num_outputs"], data.get("classes"))


def predict_split(model, split, batch_size: int) -> Predicted:
    """Class probabilities of every test example (eval mode, no gradients)."""
    import torch

    probs, labels = [], []
    with torch.no_grad():
        for x, y in split.batches(batch_size):
            probs.append(torch.softmax(model(x).float(), dim=1).cpu())
            labels.append(y.cpu())
    return Predicted(torch.cat(labels), torch.cat(probs))


def choose_examples(seen: Predicted, n: int) -> list[int]:
    """Up to half the most confidently wrong examples, the rest correct ones taken one class after
    another (the first of each class by index, then the second, ...): test-split indices."""
    wrong = most_confidently_wrong(seen, n // 2)
    correct = (seen.predicted == seen.y).nonzero().flatten().tolist()
    by_class: dict[int, list[int]] = {}
    for i in correct:
        by_class.setdefault(int(seen.y[i]), []).append(i)
    queues, picked = [by_class[c] for c in sorted(by_class)], []
    while len(picked) < n - len(wrong) and any(queues):
        for queue in queues:
            if queue and len(picked) < n - len(wrong):
                picked.append(queue.pop(0))
    return picked + wrong


def most_confidently_wrong(seen: Predicted, n: int) -> list[int]:
    """The `n` wrong predictions with the highest predicted probability, most confident first."""
    import torch

    wrong = (seen.predicted != seen.y).nonzero().flatten()
    confidence = seen.probs.max(dim=1).values[wrong]
    return wrong[torch.argsort(confidence, descending=True, stable=True)][:n].tolist()


def inputs_at(split, indices: list[int], batch_size: int) -> dict[int, Any]:
    """The split's (normalised) inputs at `indices`, in one pass over its batches (split order)."""
    wanted, found, start = set(indices), {}, 0
    for x, _ in split.batches(batch_size):
        for i in wanted & set(range(start, start + len(x))):
            found[i] = x[i - start]
        start += len(x)
        if len(found) == len(wanted):
            break
    return found


def training_background(split, batch_size: int):
    """SHAP_BACKGROUND training inputs, evenly spaced through the split: GradientShap's baselines."""
    import torch

    n = len(split)
    picks = sorted({round(i * (n - 1) / max(SHAP_BACKGROUND - 1, 1)) for i in range(min(SHAP_BACKGROUND, n))})
    found = inputs_at(split, picks, batch_size)
    return torch.stack([found[i] for i in picks])


# ------------------------------------------------------------ attributions


def attribute(model, method: str, x, targets, background=None):
    """Captum's `method` on the logit of each example's target class: attribution maps shaped like
    `x` (on the CPU) and, for Integrated Gradients, each example's completeness error (the sum of its
    attributions minus the logit difference between the input and the all-zero baseline, which is the
    training mean after normalisation). A model Captum cannot work through is a one-line error."""
    import torch
    from captum.attr import GradientShap, IntegratedGradients, Occlusion, Saliency

    from dlrun.errors import ConfigError

    model.eval()
    inputs, delta = x.detach().clone().requires_grad_(method != "occlusion"), None
    try:
        with backward_ready(model, x.device):
            if method == "integrated_gradients":
                maps, delta = IntegratedGradients(model).attribute(
                    inputs, baselines=torch.zeros_like(inputs), target=targets, n_steps=IG_STEPS,
                    internal_batch_size=256, return_convergence_delta=True)
            elif method == "saliency":
                maps = Saliency(model).attribute(inputs, target=targets, abs=True)
            elif method == "occlusion":
                window, strides = occlusion_window(tuple(inputs.shape[1:]))
                maps = Occlusion(model).attribute(inputs, sliding_window_shapes=window, strides=strides, baselines=0.0,
                                                  target=targets, perturbations_per_eval=32)
            else:
                maps = GradientShap(model).attribute(inputs, baselines=background, target=targets,
                                                     n_samples=SHAP_SAMPLES, stdevs=0.0)
    except (RuntimeError, TypeError, ValueError, AssertionError, IndexError, NotImplementedError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{type(model).__name__} cannot be explained with {method} (Captum: {first})") from None
    if not isinstance(maps, torch.Tensor) or maps.shape != x.shape or not torch.isfinite(maps).all():
        raise ConfigError(f"{type(model).__name__} cannot be explained with {method}: the attributions are not "
                          f"finite values shaped like its input {tuple(x.shape[1:])}")
    return maps.detach().float().cpu(), None if delta is None else delta.detach().float().cpu()


def backward_ready(model, device):
    """cuDNN's RNN backward runs only in training mode; on CUDA, a model with recurrent layers is
    differentiated through torch's own RNN kernels instead (eval mode kept: no dropout)."""
    import torch

    recurrent = any(isinstance(m, torch.nn.RNNBase) for m in model.modules())
    return torch.backends.cudnn.flags(enabled=False) if recurrent and device.type == "cuda" else nullcontext()


def occlusion_window(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Occlusion's patch (all channels, about an eighth of each other axis) and its stride (half a patch)."""
    window = (shape[0], *(max(1, d // 8) for d in shape[1:]))
    return window, (shape[0], *(max(1, w // 2) for w in window[1:]))


# ------------------------------------------------------------ the record and the pictures


def describe(args, checkpoint: Path, seen: Predicted, chosen: list[int], targets, maps, deltas,
             data: dict[str, Any]) -> dict[str, Any]:
    """What explain.json records for this method."""
    names = class_names(data)
    examples = []
    for j, i in enumerate(chosen):
        true, predicted, target = int(seen.y[i]), int(seen.predicted[i]), int(targets[j])
        entry = {"index": i, "true": names[true], "predicted": names[predicted], "target": names[target],
                 "correct": true == predicted, "p_true": _short(seen.probs[i, true]),
                 "p_predicted": _short(seen.probs[i, predicted]), "attribution_sum": _short(maps[j].sum())}
        if deltas is not None:
            entry["completeness_error"] = float(deltas[j])
        if maps.dim() == 3:  # signals and sequences (C, L): the attribution of each step
            entry["per_step"] = [_short(v) for v in maps[j].sum(dim=0)]
        examples.append(entry)
    wrong = int((seen.predicted != seen.y).sum())
    report = {"method": args.method, "target": args.target, "checkpoint": args.checkpoint,
              "checkpoint_file": str(checkpoint), "attributed": "the logit of the target class",
              "baseline": BASELINES[args.method],
              "test": {"size": len(seen.y), "accuracy": 1 - wrong / max(len(seen.y), 1), "misclassified": wrong},
              "examples": examples}
    if deltas is not None:
        report["completeness"] = completeness(maps, deltas)
    return report


BASELINES = {
    "integrated_gradients": f"all zeros (the training mean), {IG_STEPS} steps",
    "saliency": "none (|gradient| at the input)",
    "occlusion": "patches set to zero (the training mean)",
    "gradient_shap": f"{SHAP_BACKGROUND} training inputs, {SHAP_SAMPLES} samples",
}


def completeness(maps, deltas) -> dict[str, float]:
    """Integrated Gradients' sanity figure: how far the attributions' sums are from the logit
    differences they should add up to, absolutely and relative to those differences."""
    sums = maps.flatten(1).sum(dim=1).double()
    differences = sums - deltas.double()  # the logit at the input minus at the baseline
    relative = deltas.double().abs() / differences.abs().clamp(min=1e-12)
    return {"max_abs_error": float(deltas.abs().max()), "mean_abs_error": float(deltas.abs().mean()),
            "max_relative_error": float(relative.max())}


def _short(value) -> float:
    return round(float(value), 6)


def raw_scale(x, data: dict[str, Any]):
    """Normalised inputs back in the dataset's own scale, for drawing (on the CPU, as numpy)."""
    import torch

    x = x.detach().float().cpu()
    mean, std = data.get("mean") or [], data.get("std") or []
    if len(mean) == x.shape[1] and len(std) == x.shape[1]:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x = x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    return x.numpy()


def draw(folder, args, x, maps, seen: Predicted, chosen: list[int], wrong_inputs: list, wrong: list[int],
         data: dict[str, Any]) -> list[Path]:
    """plots/attributions_<method>.png and plots/misclassified.png."""
    import torch

    from dlrun import plots

    names = class_names(data)
    captions, title, signed = map_captions(args, seen, chosen, names, folder.path.name)
    draw_map = plots.attribution_images if x.dim() == 4 else plots.attribution_signals
    pictures = [plots.save(draw_map(raw_scale(x, data), maps.numpy(), captions, title, signed),
                           folder.attributions(args.method))]
    shown = raw_scale(torch.stack(wrong_inputs), data) if wrong_inputs else raw_scale(x[:0], data)
    wrong_captions = [f"#{i} {names[int(seen.y[i])]} → {labelled(seen, names, i, int(seen.predicted[i]))}"
                      for i in wrong]
    total = int((seen.predicted != seen.y).sum())
    pictures.append(plots.examples(folder.misclassified, shown, wrong_captions,
                                   f"{folder.path.name}: the most confidently wrong test examples, true → predicted "
                                   f"(probability); {len(wrong)} of {total} wrong of {len(seen.y)}"))
    return pictures


def labelled(seen: Predicted, names: list[str], i: int, k: int) -> str:
    """Class `k`'s name and its probability for example `i`."""
    return f"{names[k]} ({float(seen.probs[i, k]):.2f})"


def map_captions(args, seen: Predicted, chosen: list[int], names: list[str],
                 run_name: str) -> tuple[list[tuple[str, str]], str, bool]:
    """Each example's two captions (the input: its true class; the map: the class it attributes, with the
    prediction when that is another), the picture's title, and whether the maps are signed (Saliency's are
    absolute gradients: no "away from")."""
    def attributed(i: int) -> str:
        if args.target == "true":
            return f"map of true {labelled(seen, names, i, int(seen.y[i]))}; predicted {names[int(seen.predicted[i])]}"
        return f"map of predicted {labelled(seen, names, i, int(seen.predicted[i]))}"

    signed = args.method != "saliency"
    reading = "red pushes towards that class, blue away" if signed else "darker red: a larger |gradient|"
    title = (f"{run_name}: {args.method.replace('_', ' ')} of the {args.target} class ({args.checkpoint} "
             f"checkpoint); {reading}")
    return [(f"#{i} true {labelled(seen, names, i, int(seen.y[i]))}", attributed(i)) for i in chosen], title, signed


def write_report(folder, report: dict[str, Any]) -> None:
    """explain.json holds one entry per method (the latest of each), so methods and runs compare."""
    import json

    from dlrun.rundir import write_json

    try:
        existing = json.loads(folder.explain_report.read_text())
    except (OSError, ValueError):
        existing = {}
    existing = existing if isinstance(existing, dict) else {}
    entry = {k: v for k, v in report.items() if k != "written"}
    write_json(folder.explain_report, {**existing, report["method"]: entry})
