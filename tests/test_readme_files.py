"""What the README says dlrun writes, checked against what it writes: the listing under "The run folder" for a
default run (everything in it, nothing else, nothing outside it), and the data dir's caches of the
"Datasets" section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import CPU
from datafiles import write_image_folder, write_mnist

README = Path(__file__).resolve().parents[1] / "README.md"

# Entries of the listing a default run does not write, each with the words of the README that say when it is
# written; the test checks those words are still there, so the two cannot drift apart silently.
CONDITIONAL = {
    "plots/learning_curves.png": "with logger.plots=true",
    "plots/confusion_matrix.png": "... classification",
    "plots/predicted_vs_true.png": "... regression",
    "plots/attributions_<method>.png": "`dlrun-explain`",
    "plots/misclassified.png": "the most confidently wrong",
    "explain.json": "what was computed",
    ".hydra/resume-<time>/": "each `resume=` command",
    "compress.json": "what `dlrun-compress` made",
    "variants/<name>.pt": "what `dlrun-compress` made",
    "plots/lr_find.png": "with trainer.lr_find=true",
    "wandb/": "with logger=wandb",
    "checkpoints/swa.pt": "with trainer.swa_start",
    "checkpoints/top/epoch-NNNN.pt": "with trainer.save_top_k > 1",
    "export/model.<format>": "`dlrun-export`",
    "export/model.<format>.json": "`dlrun-export`",
}


def listing() -> dict[str, str]:
    """The run folder's entries in the README's listing -> their descriptions, braces and commas expanded."""
    text = README.read_text().split("## The run folder", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^  (\S.*?)\s{2,}(.*)$", line)
        if not m:
            continue
        names, what = m.groups()
        first, *more = names.split(", ")
        folder = first.rsplit("/", 1)[0] + "/" if "/" in first.rstrip("/") else ""
        for name in [first, *(folder + n for n in more)]:  # "checkpoints/last.pt, best.pt": both in checkpoints/
            brace = re.match(r"^(.*)\{(.*)\}(.*)$", name)
            for part in brace.group(2).split(",") if brace else [None]:
                entries[f"{brace.group(1)}{part}{brace.group(3)}" if brace else name] = what
    return entries


def written(folder: Path) -> set[str]:
    """Files under `folder`, named as the listing names them (a folder of many files by its name and '/')."""
    out = set()
    for path in folder.rglob("*"):
        if path.is_file():
            rel = path.relative_to(folder)
            out.add(f"{rel.parts[0]}/" if rel.parts[0] == "tensorboard" else str(rel))
    return out


def test_the_listing_is_parsed_as_written():
    entries = listing()
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "metrics.jsonl", "summary.json",
            "checkpoints/last.pt", "checkpoints/best.pt", "tensorboard/", "dlrun.log", ".dlrun.lock"} <= entries.keys()
    for name, words in CONDITIONAL.items():
        assert words in entries[name], (name, entries[name])


def test_a_default_run_writes_the_listing_and_nothing_else(cli, tmp_path, monkeypatch):
    """`dlrun` in an empty folder: one run folder under outputs/<date>/<time>/ holding exactly the listing's
    unconditional entries; nothing else in the working directory, nothing in the data dir (digits ship with
    scikit-learn: no cache)."""
    monkeypatch.setenv("DLRUN_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "work").mkdir()
    cli("dlrun", "trainer.epochs=2", *CPU, cwd=tmp_path / "work", check=True)
    runs = [p.parent for p in (tmp_path / "work").rglob("summary.json")]
    assert len(runs) == 1 and re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d",
                                           str(runs[0].relative_to(tmp_path / "work")))
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["outputs"]
    assert written(runs[0]) == set(listing()) - set(CONDITIONAL)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("dataset, cached", [
    ("mnist1d", "mnist1d/"),  # "generated, cached under the data dir"
    ("mnist", "dlrun-cache/"),  # torchvision formats: "<data_dir>/dlrun-cache/" once torchvision has read them
    ("imagefolder", "imagefolder/"),  # "Decoded image folders ... are cached as .npz under the data dir"
])
def test_the_data_dir_gets_the_caches_the_readme_names(cli, tmp_path, monkeypatch, dataset, cached):
    data, extra = tmp_path / "data", []
    if dataset == "mnist":
        write_mnist(data, n_train=120, n_test=40)
    if dataset == "imagefolder":
        extra = [f"dataset.root={write_image_folder(tmp_path / 'images', classes=2, per_class=10, size=8)}"]
    raw = sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file()) if data.exists() else []
    monkeypatch.setenv("DLRUN_DATA_DIR", str(data))
    cli("dlrun", f"dataset={dataset}", *extra, "hydra.run.dir=run", "trainer.epochs=1",
        "trainer.limit_train_batches=1", *CPU, check=True)
    new = sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file() and p.relative_to(data) not in raw)
    assert new and all(str(p).startswith(cached) and p.suffix == ".npz" for p in new), new
