"""`dlrun-predict`: a trained run's model on new inputs, or on its dataset's test split.

    dlrun-predict <run folder | checkpoint.pt> image.png more.jpg      top-k classes with probabilities
    dlrun-predict <run folder | checkpoint.pt> inputs.pt                 a tensor (N, *input shape) or one sample
    dlrun-predict <run folder | checkpoint.pt> --evaluate                loss and accuracy on the test split
    dlrun-predict <run folder | checkpoint.pt> ... --tta flip            averaged with the mirrored images

Inputs are taken in the dataset's raw scale (image files as 0..255 pixels, tensor files as the
dataset's own values) and normalised with the training split's statistics saved in the checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlrun.tools import positive_int

if TYPE_CHECKING:  # nothing heavy at run time: `dlrun-predict --help` and argument errors answer without torch
    import numpy as np
    import torch


def read_inputs(paths: list[Path], data: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """Raw inputs, normalised as in training: (N, *input_shape) float32, in the order of `paths`, and
    what each row is (the file's name, with the sample's index for a tensor file of several).

    Image files are decoded and resized. A .pt file holds one tensor (torch.save) and a .npy file
    one array (numpy.save) of real numbers (bool, integer or floating point: converted to float32),
    (N, *input_shape) or a single sample; neither is unpickled beyond plain tensor data, so
    nothing in a file can run. A file that cannot be used, or values that are NaN or infinite,
    raise a ConfigError that names the file, the problem and what is accepted.
    """
    import torch

    from dlrun.data import IMAGE_SUFFIXES
    from dlrun.errors import ConfigError

    shape = tuple(data["input_shape"])
    dims = ", ".join(map(str, shape))
    parts, labels = [], []
    for path in paths:
        if path.is_dir():
            raise ConfigError(f"{path}: a folder; give the image or tensor files themselves")
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if len(shape) != 3:
                raise ConfigError(f"{path}: an image, but the model takes {shape} inputs")
            parts.append(torch.from_numpy(_read_image(path, shape)).float()[None])
            labels.append(str(path))
            continue
        if suffix not in (".pt", ".npy"):
            raise ConfigError(f"{path}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a .pt/.npy tensor")
        raw = _read_npy(path) if suffix == ".npy" else _read_pt(path)
        x = raw.float()
        x = x[None] if tuple(x.shape) == shape else x
        if tuple(x.shape[1:]) != shape:
            raise ConfigError(f"{path}: shape {tuple(x.shape)}, expected (N, {dims})")
        if len(x) == 0:
            raise ConfigError(f"{path}: holds no samples (shape {tuple(x.shape)}), expected (N, {dims}) with N >= 1")
        bad = ~torch.isfinite(x)
        if bad.any():
            sample = int(bad.flatten(1).any(1).nonzero()[0])
            overflow = bool(torch.isfinite(raw.reshape(x.shape)[bad]).all())  # finite as given, not as float32
            what = "values beyond float32's range" if overflow else "NaN or infinite values"
            raise ConfigError(f"{path}: holds {what} (sample {sample}); expected finite numbers")
        parts.append(x)
        labels += [str(path)] if len(x) == 1 else [f"{path} [{i}]" for i in range(len(x))]
    x = torch.cat(parts)
    stats_shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, std = torch.tensor(data["mean"]).view(stats_shape), torch.tensor(data["std"]).view(stats_shape)
    return (x - mean) / std, labels


def _empty_file(path: Path, expected: str) -> None:
    from dlrun.errors import ConfigError

    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: the file is empty; expected {expected}")


def _read_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """An image file as read_inputs takes it, (C, H, W) uint8; anything Pillow cannot decode
    (or refuses to: more pixels than its decompression-bomb limit) is a ConfigError."""
    import re

    from PIL import Image, UnidentifiedImageError

    from dlrun.data import IMAGE_SUFFIXES, decode_image
    from dlrun.errors import ConfigError

    expected = f"an image file ({', '.join(sorted(IMAGE_SUFFIXES))}) that Pillow can read"
    _empty_file(path, expected)
    try:
        return decode_image(str(path), shape[1:], shape[0])
    except Image.DecompressionBombError as err:
        sizes = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(err))
        size = f"{int(sizes[1]):,} pixels, more than {int(sizes[2]):,}" if sizes else str(err)
        raise ConfigError(f"{path}: the image is too large to decode safely ({size}); expected a smaller image") from None
    except UnidentifiedImageError:
        raise ConfigError(f"{path}: not an image, or in a format Pillow cannot identify; expected {expected}") from None
    except (OSError, ValueError, EOFError, SyntaxError) as err:  # what Pillow raises for damaged files
        raise ConfigError(f"{path}: the image cannot be decoded ({err}); expected {expected}") from None


def _read_pt(path: Path) -> torch.Tensor:
    """The one dense, real-valued CPU tensor in a torch.save file, loaded with weights_only=True:
    a file that holds anything else (other objects, or pickled code) is a ConfigError."""
    import re
    import warnings

    import torch

    from dlrun.errors import ConfigError

    expected = "a tensor saved with torch.save(tensor, path)"
    _empty_file(path, expected)
    try:
        with warnings.catch_warnings():  # torch's warnings about the file's pickle (its protocol, sparse checks)
            warnings.simplefilter("ignore")
            x = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to load a user's file is the file's
        # torch's own text advises weights_only=False, i.e. running the file's code: never pass that on.
        name = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        detail = f" (it refers to {name[1]})" if name else ""
        raise ConfigError(f"{path}: not a tensor file that can be loaded safely{detail}; expected {expected}") from None
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{path}: holds a {type(x).__name__}, not a tensor; expected {expected}")
    if x.layout != torch.strided:
        raise ConfigError(f"{path}: holds a sparse tensor ({x.layout}); expected a dense one (tensor.to_dense())")
    if x.device.type == "meta":
        raise ConfigError(f"{path}: holds a tensor with no data (on the meta device); expected {expected}")
    if x.is_quantized or x.is_complex():
        raise ConfigError(f"{path}: holds a {x.dtype} tensor; expected real numbers (bool, integer or floating point)")
    return x.detach()


_NUMPY_KINDS = {"U": "strings", "S": "bytes", "O": "Python objects", "V": "structured records",
                "M": "datetimes", "m": "time deltas", "c": "complex numbers"}


def _read_npy(path: Path) -> torch.Tensor:
    """The array of real numbers in a numpy.save file, loaded without unpickling anything (an
    object array, whose data is a pickle, is refused), in native byte order."""
    import numpy as np
    import torch

    from dlrun.errors import ConfigError

    expected = "an array of numbers saved with numpy.save(path, array)"
    _empty_file(path, expected)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"PK"):
        raise ConfigError(f"{path}: an .npz archive (numpy.savez), not one array; expected {expected}")
    if magic != b"\x93NUMPY":
        raise ConfigError(f"{path}: not a .npy file; expected {expected}")
    try:
        arr = np.load(path, allow_pickle=False)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to load a user's file is the file's
        if "allow_pickle" in str(err):  # numpy's text advises allow_pickle=True: never pass that on
            raise ConfigError(f"{path}: holds Python objects (an object array), which are never unpickled; "
                              f"expected {expected}") from None
        raise ConfigError(f"{path}: a damaged .npy file ({err}); expected {expected}") from None
    if arr.dtype.kind not in "biuf":
        what = _NUMPY_KINDS.get(arr.dtype.kind, "values that are not numbers")
        raise ConfigError(f"{path}: holds {what} (dtype {arr.dtype}); expected real numbers (bool, integer or float)")
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=False))


def predict(model: torch.nn.Module, x: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k class probabilities and indices, (N, k) each (k: `topk`, at most the number of classes)."""
    import torch

    from dlrun.errors import ConfigError

    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ConfigError(f"topk must be a positive integer, not {topk!r}")
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1)
    return probs.topk(min(topk, probs.shape[1]), dim=1)


TTA = ("none", "flip")


def with_tta(model: torch.nn.Module, tta: str, data: dict[str, Any]) -> torch.nn.Module:
    """The model, or (`--tta flip`) the model averaged over each image and its mirror image; a model that does not
    take images is refused."""
    from dlrun.errors import ConfigError
    from dlrun.models.tta import FlipTTA

    if tta == "none":
        return model
    if len(data["input_shape"]) != 3:
        raise ConfigError(f"--tta flip mirrors images left to right; this model takes {tuple(data['input_shape'])} "
                          "inputs (signals or sequences), which a mirror image would change in meaning")
    return FlipTTA(model, data["task"] == "classification").eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dlrun-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a run folder (its best checkpoint) or a checkpoint file")
    parser.add_argument("inputs", nargs="*", type=Path, help="image files, or .pt/.npy tensor files")
    parser.add_argument("--topk", type=positive_int, default=3, help="classes to show per input (default 3)")
    parser.add_argument("--evaluate", action="store_true", help="evaluate on the dataset's test split")
    parser.add_argument("--tta", default="none", choices=TTA,
                        help="test-time augmentation: flip averages each image's prediction with its mirror image's "
                             "(left to right); default none")
    parser.add_argument("--trust", action="append", default=[], metavar="TARGET",
                        help="a class or function outside dlrun that the checkpoint names (e.g. a model=custom "
                             "model) and that you trust to run; repeat for several")
    args = parser.parse_args(argv)
    if not args.inputs and not args.evaluate:
        parser.error("give input files, or --evaluate")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)  # before anything heavy is imported
    from dlrun.checkpoint import load_model
    from dlrun.config.targets import import_user_code
    from dlrun.errors import DlrunError

    try:
        if args.trust:
            import_user_code()
        model, cfg, data = load_model(args.model, args.trust)
        model = with_tta(model, args.tta, data)
        if args.evaluate:
            print_evaluation(model, cfg, data, args.tta)
        if args.inputs:
            print_predictions(model, *read_inputs(args.inputs, data), data, args.topk)
    except DlrunError as err:
        raise SystemExit(f"dlrun-predict: error: {err}") from None


def print_evaluation(model: torch.nn.Module, cfg: Any, data: dict[str, Any], tta: str = "none") -> None:
    """Loss and score of the model on its dataset's test split, rebuilt from the checkpoint's config."""
    import torch
    from rich.console import Console

    from dlrun.data import build_dataset
    from dlrun.train import evaluate

    split = build_dataset(cfg.dataset, torch.device("cpu")).splits["test"]
    scores = evaluate(model, split, cfg.trainer.eval_batch_size, task=data["task"])
    with_what = "" if tta == "none" else f" (test-time augmentation: {tta})"
    Console().print(f"test split of {data['name']}{with_what}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def print_predictions(model: torch.nn.Module, x: torch.Tensor, sources: list[str], data: dict[str, Any],
                      topk: int) -> None:
    """Regression: the predicted values per input; classification: a table of the top-k classes."""
    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if data["task"] == "regression":
        with torch.no_grad():
            for source, row in zip(sources, model(x)):
                console.print(f"{source}: " + " ".join(f"{v:.4f}" for v in row.tolist()))
        return
    probs, index = predict(model, x, topk)
    names = data.get("classes") or [str(i) for i in range(data["num_outputs"])]
    table = Table(header_style="bold")
    for column in ("input", "rank", "class", "probability"):
        table.add_column(column, justify="right" if column == "probability" else "left")
    for source, p, k in zip(sources, probs.tolist(), index.tolist()):
        for rank, (prob, cls) in enumerate(zip(p, k), start=1):
            table.add_row(source if rank == 1 else "", str(rank), names[cls], f"{prob:.4f}")
    console.print(table)
