"""dlrun-explain: Captum attributions of a run's test examples, and its pictures and record."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import CPU, DLRUN, read_summary
from dlrun.errors import ConfigError
from dlrun.tools import explain
from dlrun.tools.explain import METHODS, Predicted

EXPLAIN = str(Path(DLRUN).with_name("dlrun-explain"))


class SmoothNet(nn.Module):
    """A small tanh network on (1, 8, 8) images: smooth, so Integrated Gradients' integral is exact
    up to quadrature."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, k))

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(64, k))

    def forward(self, x):
        return self.net(x)


class SmallGRU(nn.Module):
    """(B, 1, L) signals read step by step."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.gru = nn.GRU(1, 8, batch_first=True)
        self.head = nn.Linear(8, k)

    def forward(self, x):
        out, _ = self.gru(x.transpose(1, 2))  # (B, L, 8)
        return self.head(out[:, -1])


class OnePixel(nn.Module):
    """Looks only at pixel (3, 5): class scores are multiples of it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))

    def forward(self, x):
        return x[:, 0, 3, 5, None] * self.scale + torch.tanh(x[:, 0, 3, 5, None])


class Detached(nn.Module):
    """Trains (its weights get gradients) but cuts the input off the graph: nothing to attribute to it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(x.detach().flatten(1))


def fitted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def image_data(n: int = 96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean(dim=(1, 2)) > 0).long() + (x[:, 0, 4:].mean(dim=(1, 2)) > 0.2).long()
    return x, y


def test_integrated_gradients_is_complete_on_a_trained_model():
    torch.manual_seed(0)
    x, y = image_data()
    model = fitted(SmoothNet(), x, y)
    inputs, targets = x[:6], model(x[:6]).argmax(1)
    maps, deltas = explain.attribute(model, "integrated_gradients", inputs, targets)
    with torch.no_grad():  # the logit difference between the input and the all-zero baseline, computed here
        difference = (model(inputs) - model(torch.zeros_like(inputs))).gather(1, targets[:, None]).squeeze(1)
    sums = maps.flatten(1).sum(1)
    assert difference.abs().min() > 0.1  # a trained model: the attributions have something to add up to
    assert sums == pytest.approx(difference, rel=1e-3, abs=1e-4)
    assert deltas == pytest.approx(sums - difference, abs=1e-4)  # Captum's own delta is that error
    report = explain.completeness(maps, deltas)
    assert report["max_relative_error"] < 1e-3


def test_integrated_gradients_completeness_of_a_relu_cnn_is_within_a_few_percent():
    x, y = image_data()
    model = fitted(SmallCNN(), x, y)
    maps, deltas = explain.attribute(model, "integrated_gradients", x[:8], model(x[:8]).argmax(1))
    assert explain.completeness(maps, deltas)["max_relative_error"] < 0.05


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model, shape", [(SmallCNN, (1, 8, 8)), (SmallGRU, (1, 24)), (SmoothNet, (1, 8, 8))])
def test_attribution_maps_have_the_input_shape(method, model, shape):
    torch.manual_seed(0)
    x = torch.randn(5, *shape)
    net = model().eval()
    background = torch.randn(7, *shape) if method == "gradient_shap" else None
    maps, deltas = explain.attribute(net, method, x, torch.tensor([0, 1, 2, 0, 1]), background)
    assert maps.shape == x.shape and torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert (deltas is not None) == (method == "integrated_gradients")


@pytest.mark.parametrize("method", ["saliency", "occlusion", "integrated_gradients"])
def test_a_model_that_looks_at_one_pixel_gets_all_the_attribution_there(method):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8) + 1.0
    maps, _ = explain.attribute(OnePixel().eval(), method, x, torch.tensor([0, 1, 2, 2]))
    mass = maps.abs().sum(dim=(1, 2, 3))
    assert mass.min() > 0
    assert (maps.abs()[:, 0, 3, 5] / mass).min() > 0.99  # (occlusion: one-pixel patches on 8x8 inputs)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gradient_shap"])
def test_a_model_captum_cannot_work_through_is_a_one_line_error(method):
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(ConfigError, match=f"Detached cannot be explained with {method}") as err:
        explain.attribute(Detached().eval(), method, x, torch.tensor([0, 1, 2]), torch.randn(4, 1, 8, 8))
    assert "\n" not in str(err.value)


def test_examples_are_the_most_confidently_wrong_and_correct_ones_class_by_class():
    probs = torch.tensor([
        [0.9, 0.1, 0.0],  # 0: correct, class 0
        [0.2, 0.8, 0.0],  # 1: correct, class 1
        [0.6, 0.4, 0.0],  # 2: wrong (true 1), confidence 0.6
        [0.05, 0.95, 0.0],  # 3: wrong (true 2), confidence 0.95
        [0.7, 0.3, 0.0],  # 4: correct, class 0
        [0.0, 0.3, 0.7],  # 5: correct, class 2
    ])
    seen = Predicted(torch.tensor([0, 1, 1, 2, 0, 2]), probs)
    assert explain.most_confidently_wrong(seen, 5) == [3, 2]
    assert explain.choose_examples(seen, 4) == [0, 1, 3, 2]  # two correct (classes 0, 1), two wrong
    assert explain.choose_examples(seen, 6) == [0, 1, 5, 4, 3, 2]
    assert explain.choose_examples(seen, 1) == [0]


def test_occlusion_patches_scale_with_the_input():
    assert explain.occlusion_window((3, 32, 32)) == ((3, 4, 4), (3, 2, 2))
    assert explain.occlusion_window((1, 40)) == ((1, 5), (1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recurrent_models_are_attributed_on_cuda_in_eval_mode():
    net = SmallGRU().cuda().eval()
    x = torch.randn(4, 1, 24, device="cuda")
    maps, _ = explain.attribute(net, "integrated_gradients", x, torch.tensor([0, 1, 2, 0], device="cuda"))
    assert maps.shape == x.shape and not net.training


# ------------------------------------------------------------ end to end

DIGITS = ("trainer.epochs=3", *CPU)  # the digits CNN test_compress compresses too
# 600 samples of MNIST-1D (as in test_distill and test_toolbox): what is checked are the attributions per step
# and the record, not the scores
M1D_CNN = ("dataset=mnist1d", "dataset.num_samples=600", "model=cnn", "trainer.epochs=2", *CPU)
M1D_GRU = ("experiment=mnist1d_gru", "trainer.epochs=1", "trainer.batch_size=128", "dataset.num_samples=600", *CPU)
SEQUENCE = ("dataset=sequence", "model=mlp", "trainer.epochs=1", *CPU)
# dlrun-explain writes plots/ and explain.json into the run folder: each test explains a copy of the shared run


def png_ok(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_explain_a_digits_cnn(cli, trained, tmp_path):
    run = shutil.copytree(trained(*DIGITS), tmp_path / "digits")
    ran = cli("dlrun-explain", "digits", "--examples", "6")
    assert ran.returncode == 0, ran.stderr
    assert png_ok(run / "plots" / "attributions_integrated_gradients.png")
    assert png_ok(run / "plots" / "misclassified.png")
    report = json.loads((run / "explain.json").read_text())["integrated_gradients"]
    summary = read_summary(run)
    # the test split rebuilt as the run built it, predicted with the best weights: the run's own figures
    assert report["test"]["size"] == summary["data"]["sizes"]["test"]
    assert report["test"]["accuracy"] == pytest.approx(summary["best"]["test/acc"])
    matrix = np.array(summary["classes"]["best"]["confusion_matrix"])
    assert report["test"]["misclassified"] == matrix.sum() - np.trace(matrix)
    examples = report["examples"]
    assert len(examples) == 6 and report["checkpoint"] == "best" and report["target"] == "predicted"
    for e in examples:
        assert e["correct"] == (e["true"] == e["predicted"]) and e["target"] == e["predicted"]
        assert e["p_predicted"] >= e["p_true"] and abs(e["completeness_error"]) < 0.2
    wrong = [e for e in examples if not e["correct"]]
    assert len(wrong) == min(3, report["test"]["misclassified"])
    assert [e["index"] for e in wrong] == [m["index"] for m in report["misclassified"][:len(wrong)]]
    assert report["completeness"]["max_relative_error"] < 0.05
    assert "completeness" in ran.stdout


def test_explain_mnist1d_cnn_with_occlusion_and_the_true_class(cli, trained, tmp_path):
    run = shutil.copytree(trained(*M1D_CNN), tmp_path / "m1d_cnn")
    ran = cli("dlrun-explain", "m1d_cnn", "--method", "occlusion", "--target", "true", "--checkpoint", "last")
    assert ran.returncode == 0, ran.stderr
    assert png_ok(run / "plots" / "attributions_occlusion.png") and png_ok(run / "plots" / "misclassified.png")
    report = json.loads((run / "explain.json").read_text())["occlusion"]
    assert report["checkpoint"] == "last" and "completeness" not in report
    assert all(e["target"] == e["true"] and len(e["per_step"]) == 40 for e in report["examples"])


def test_explain_mnist1d_gru_per_time_step(cli, trained, tmp_path):
    run = shutil.copytree(trained(*M1D_GRU), tmp_path / "m1d_gru")
    for method in ("integrated_gradients", "saliency"):
        ran = cli("dlrun-explain", "m1d_gru", "--method", method, "--device", "cpu")
        assert ran.returncode == 0, ran.stderr
        assert png_ok(run / "plots" / f"attributions_{method}.png")
    report = json.loads((run / "explain.json").read_text())
    assert set(report) == {"integrated_gradients", "saliency"}  # one entry per method
    ig = report["integrated_gradients"]
    assert all(len(e["per_step"]) == 40 for e in ig["examples"])
    assert all(sum(e["per_step"]) == pytest.approx(e["attribution_sum"], abs=1e-3) for e in ig["examples"])
    assert ig["completeness"]["max_relative_error"] < 0.01  # smooth gates: the quadrature is nearly exact
    assert all(min(e["per_step"]) >= 0 for e in report["saliency"]["examples"])  # |gradient|


def test_refusals_are_one_line_and_write_nothing(cli, trained, tmp_path):
    shutil.copytree(trained(*DIGITS), tmp_path / "digits")
    shutil.copytree(trained(*SEQUENCE), tmp_path / "sequence")
    (tmp_path / "empty").mkdir()
    cases = [
        (["sequence"], "a regression model (sequence)"),
        (["digits", "--method", "lime"], "--method lime is unknown; allowed: integrated_gradients"),
        (["digits", "--checkpoint", "first"], "--checkpoint first is unknown"),
        (["empty"], "no checkpoint to explain"),
        (["nowhere"], "not a run folder"),
    ]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    for args, message in cases:
        ran = cli("dlrun-explain", *args)
        assert ran.returncode == 1, (args, ran.stderr)
        assert ran.stderr.strip().count("\n") == 0 and message in ran.stderr, ran.stderr
    assert not (tmp_path / "sequence" / "explain.json").exists()
    assert not (tmp_path / "sequence" / "plots" / "misclassified.png").exists()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_the_installed_command_refuses_what_is_not_a_run(tmp_path):
    """The console script itself: its exit status and its one line on stderr."""
    proc = subprocess.run([EXPLAIN, "nowhere"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "dlrun-explain: error: nowhere: not a run folder (give the folder a dlrun run wrote)"


def test_captions_say_which_class_a_map_is_of_and_how_to_read_it():
    """With --target true, a map's panel names the true class (and the prediction when it differs); Saliency's
    unsigned maps are not read as "towards/away"."""
    import argparse

    seen = Predicted(torch.tensor([0, 1]), torch.tensor([[0.9, 0.1], [0.7, 0.3]]))  # example 1 is wrong
    names = ["cat", "dog"]
    args = argparse.Namespace(target="true", method="integrated_gradients", checkpoint="best")
    captions, title, signed = explain.map_captions(args, seen, [0, 1], names, "run")
    assert captions[1] == ("#1 true dog (0.30)", "map of true dog (0.30); predicted cat") and signed
    assert title == "run: integrated gradients of the true class (best checkpoint); red pushes towards that class, " \
                    "blue away"
    args = argparse.Namespace(target="predicted", method="saliency", checkpoint="last")
    captions, title, signed = explain.map_captions(args, seen, [1], names, "run")
    assert captions == [("#1 true dog (0.30)", "map of predicted cat (0.70)")] and not signed
    assert title.endswith("darker red: a larger |gradient|") and "blue" not in title


@pytest.mark.parametrize("signed,scale", [(True, "bwr"), (False, "Reds")])
def test_every_attribution_map_has_its_colour_bar(signed, scale):
    from dlrun import plots

    maps = np.random.default_rng(0).standard_normal((3, 1, 8, 8))
    fig = plots.attribution_images(np.zeros((3, 1, 8, 8)), np.abs(maps) if not signed else maps,
                                   [("a", "b")] * 3, "t", signed)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 3  # one per map, on its own scale
    low, high = bars[0].get_ylim()
    assert (low < 0 < high) == signed and high > 0
    assert all(bar.collections or bar.images for bar in bars)
    fig = plots.attribution_signals(np.zeros((2, 1, 40)), np.abs(maps[:2, :, 0].repeat(5, axis=-1)),
                                    [("a", "b")] * 2, "t", signed)
    assert [im.get_cmap().name for ax in fig.axes for im in ax.images][:2] == [scale, scale]
