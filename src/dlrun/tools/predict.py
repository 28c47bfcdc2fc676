"""`dlrun-predict`: a trained run's model on new inputs, or on its dataset's test split.

    dlrun-predict <run folder | checkpoint.pt> image.png more.jpg      top-k classes with probabilities
    dlrun-predict <run folder | checkpoint.pt> inputs.pt                 a tensor (N, *input shape) or one sample
    dlrun-predict <run folder | checkpoint.pt> --evaluate                loss and accuracy on the test split

Inputs are taken in the dataset's raw scale (image files as 0..255 pixels, tensor files as the
dataset's own values) and normalised with the training split's statistics saved in the checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from dlrun import checkpoint
from dlrun.config.targets import instantiate_trusted
from dlrun.data import IMAGE_SUFFIXES, DataSpec, build_data, decode_image
from dlrun.errors import ConfigError, DlrunError
from dlrun.models import build_model
from dlrun.rundir import RunDir
from dlrun.train import evaluate

CPU = torch.device("cpu")


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The model of a run folder (its best checkpoint) or of a checkpoint file, in eval mode, with
    the checkpoint's config and data description."""
    path = Path(path)
    ckpt = checkpoint.load(RunDir(path).best if path.is_dir() else path)
    if "data" not in ckpt:
        raise ConfigError(f"{path}: the checkpoint has no data description (written by an older dlrun)")
    data = ckpt["data"]
    spec = DataSpec(tuple(data["input_shape"]), data["num_outputs"], data["task"], data["name"])
    model = build_model(OmegaConf.create(ckpt["config"]).model, spec)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["config"], data


def read_inputs(paths: list[Path], data: dict[str, Any]) -> torch.Tensor:
    """Raw inputs, normalised as in training: (N, *input_shape) float32."""
    shape = tuple(data["input_shape"])
    parts = []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if len(shape) != 3:
                raise ConfigError(f"{path}: an image, but the model takes {shape} inputs")
            parts.append(torch.from_numpy(decode_image(str(path), shape[1:], shape[0])).float()[None])
        elif path.suffix in (".pt", ".npy"):
            x = torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)
            x = x.float()
            x = x[None] if tuple(x.shape) == shape else x
            if tuple(x.shape[1:]) != shape:
                raise ConfigError(f"{path}: shape {tuple(x.shape)}, expected (N, {', '.join(map(str, shape))})")
            parts.append(x)
        else:
            raise ConfigError(f"{path}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a .pt/.npy tensor")
    x = torch.cat(parts)
    stats_shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, std = torch.tensor(data["mean"]).view(stats_shape), torch.tensor(data["std"]).view(stats_shape)
    return (x - mean) / std


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k class probabilities and indices, (N, k) each."""
    probs = torch.softmax(model(x).float(), dim=1)
    return probs.topk(min(topk, probs.shape[1]), dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dlrun-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a run folder (its best checkpoint) or a checkpoint file")
    parser.add_argument("inputs", nargs="*", type=Path, help="image files, or .pt/.npy tensor files")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--evaluate", action="store_true", help="evaluate on the dataset's test split")
    args = parser.parse_args(argv)
    if not args.inputs and not args.evaluate:
        parser.error("give input files, or --evaluate")
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        model, config, data = load_model(args.model)
        if args.evaluate:
            cfg = OmegaConf.create(config)
            split = build_data(instantiate_trusted(cfg.dataset), CPU).splits["test"]
            scores = evaluate(model, split, cfg.trainer.eval_batch_size, task=data["task"])
            console.print(f"test split of {data['name']}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if args.inputs:
            x = read_inputs(args.inputs, data)
            if data["task"] == "regression":
                with torch.no_grad():
                    for i, row in enumerate(model(x)):
                        console.print(f"{i}: " + " ".join(f"{v:.4f}" for v in row.tolist()))
                return
            probs, index = predict(model, x, args.topk)
            names = data.get("classes") or [str(i) for i in range(data["num_outputs"])]
            sources = [str(p) for p in args.inputs for _ in range(1 if p.suffix.lower() in IMAGE_SUFFIXES else 0)]
            sources += [f"sample {i}" for i in range(len(sources), len(x))]
            table = Table(header_style="bold")
            for column in ("input", "rank", "class", "probability"):
                table.add_column(column, justify="right" if column == "probability" else "left")
            for source, p, k in zip(sources, probs.tolist(), index.tolist()):
                for rank, (prob, cls) in enumerate(zip(p, k), start=1):
                    table.add_row(source if rank == 1 else "", str(rank), names[cls], f"{prob:.4f}")
            console.print(table)
    except DlrunError as err:
        raise SystemExit(f"dlrun-predict: error: {err}") from None
