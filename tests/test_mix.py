"""trainer.mixup / trainer.cutmix (torchvision.transforms.v2's MixUp and CutMix on training batches) and
dataset.augment=randaugment: mixed targets sum to 1 and match the mixed inputs, the draws are a pure function of
the batch's generator (the global RNG is left alone), runs resume bit-exactly; regression and CutMix on signals
are refused."""

from __future__ import annotations

import pytest
import torch

from conftest import CPU, read_metrics
from dlrun.data import Mix, batch_generator

QUIET = ("scheduler=none", "trainer.model_summary=false", *CPU)


def batch(shape=(16, 3, 8, 8), classes=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)


def test_mixup_mixes_each_sample_with_the_next_by_the_share_its_target_says():
    x, y = batch()
    mixed, target = Mix(mixup=0.4, cutmix=0.0, classes=5)(x, y, batch_generator(0, 1, 0))
    assert target.shape == (16, 5) and torch.allclose(target.sum(1), torch.ones(16))
    other = y.roll(1)
    for i in range(16):
        share = target[i, y[i]].item() if y[i] != other[i] else None
        if share is not None:  # x_i' = share * x_i + (1 - share) * x_(i-1)
            torch.testing.assert_close(mixed[i], share * x[i] + (1 - share) * x.roll(1, 0)[i])


def test_cutmix_pastes_a_box_whose_area_is_the_targets_share():
    x, y = batch()
    mixed, target = Mix(mixup=0.0, cutmix=1.0, classes=5)(x, y, batch_generator(0, 1, 3))
    assert torch.allclose(target.sum(1), torch.ones(16))
    own = (mixed == x).all(1).float().mean((1, 2))  # share of each image's own pixels (8x8 of them)
    pasted = (mixed == x.roll(1, 0)).all(1).float().mean((1, 2))
    assert torch.allclose(own + pasted, torch.ones(16))
    for i in torch.nonzero(y != y.roll(1)).flatten():
        assert target[i, y[i]].item() == pytest.approx(own[i].item())


def test_the_draws_are_a_function_of_the_generator_and_leave_the_global_rng_alone():
    x, y = batch(shape=(16, 1, 40))  # signals: MixUp only
    mix = Mix(mixup=0.2, cutmix=0.0, classes=5)
    before = torch.get_rng_state()
    first, again, other = (mix(x, y, batch_generator(0, 1, b)) for b in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]) and not torch.equal(first[0], other[0])


def test_a_mixed_run_resumes_bit_exactly(cli, tmp_path):
    mixed = ("trainer.mixup=0.2", "trainer.cutmix=1.0", *QUIET)
    cli("dlrun", "hydra.run.dir=whole", "trainer.epochs=3", *mixed, check=True)
    cli("dlrun", "hydra.run.dir=cut", "trainer.epochs=2", *mixed, check=True)
    cli("dlrun", f"resume={tmp_path / 'cut'}", "trainer.epochs=3", check=True)
    strip = lambda rows: [{k: v for k, v in r.items() if "second" not in k and "samples_per_s" not in k}  # noqa: E731
                          for r in rows]
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "cut"))
    whole, cut = (torch.load(tmp_path / f"{r}/checkpoints/last.pt", weights_only=True)["model"] for r in ("whole", "cut"))
    assert all(torch.equal(v, cut[k]) for k, v in whole.items())
    plain = read_metrics(tmp_path / "whole")[0]["train/loss"]
    cli("dlrun", "hydra.run.dir=plain", "trainer.epochs=1", *QUIET, check=True)
    assert read_metrics(tmp_path / "plain")[0]["train/loss"] != plain  # the mixing took place


@pytest.mark.parametrize("overrides, said", [
    (["dataset=sequence", "model=mlp", "trainer.mixup=0.2"], "trainer.mixup=0.2 is invalid: mixes class labels"),
    (["dataset=mnist1d", "trainer.cutmix=1.0"], "trainer.cutmix=1.0 is invalid: CutMix pastes boxes between images"),
    (["trainer.mixup=-1"], "trainer.mixup=-1.0 is invalid: must be >= 0"),
])
def test_bad_settings_are_one_line(cli, tmp_path, overrides, said):
    ran = cli("dlrun", *overrides, *CPU)
    assert ran.returncode != 0 and said in ran.stderr, ran.stderr
    assert not (tmp_path / "outputs").exists()


def test_randaugment_changes_images_per_image_from_the_generator_alone():
    """dataset.augment=randaugment: each image its own operations, drawn from the batch's generator (the global RNG
    is left alone); the result stays on the data's scale (0..top in raw units, normalised back)."""
    from dlrun.data import Augment

    mean, std = (0.3,), (0.2,)
    raw = torch.randint(0, 256, (32, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float()
    x = (raw - mean[0] * 255) / (std[0] * 255)  # normalised, as the training split is, with top = 255
    augment = Augment(randaugment=True, mean=(mean[0] * 255,), std=(std[0] * 255,), top=255.0)
    before = torch.get_rng_state()
    out, again = augment(x, batch_generator(0, 1, 0)), augment(x, batch_generator(0, 1, 0))
    assert torch.equal(torch.get_rng_state(), before) and torch.equal(out, again)
    assert not torch.equal(out, augment(x, batch_generator(0, 1, 1)))
    pixels = out * std[0] * 255 + mean[0] * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3) and pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    changed = [(o - i).abs().max().item() > 1e-4 for o, i in zip(out, x)]
    assert 0 < sum(changed) and not all(torch.equal(out[0], o) for o in out[1:])  # image by image


def test_a_randaugmented_run_resumes_bit_exactly(cli, tmp_path):
    augmented_run = ("dataset.augment=randaugment", *QUIET)
    cli("dlrun", "hydra.run.dir=whole", "trainer.epochs=2", *augmented_run, check=True)
    cli("dlrun", "hydra.run.dir=cut", "trainer.epochs=1", *augmented_run, check=True)
    cli("dlrun", f"resume={tmp_path / 'cut'}", "trainer.epochs=2", check=True)
    whole, cut = (torch.load(tmp_path / f"{r}/checkpoints/last.pt", weights_only=True)["model"] for r in ("whole", "cut"))
    assert all(torch.equal(v, cut[k]) for k, v in whole.items())


def test_an_unknown_augmentation_is_one_line(cli, tmp_path):
    ran = cli("dlrun", "dataset.augment=autoaugment", *CPU)
    assert ran.returncode != 0 and "dataset.augment='autoaugment' is invalid: allowed: none, randaugment" in ran.stderr
