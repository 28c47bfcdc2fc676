"""1-D augmentation (MNIST-1D, sequences): random shifts with zero padding and Gaussian noise, batched on the
device, a pure function of (seed, epoch, batch), refused where it is not valid, and exact on resume."""

from __future__ import annotations

import pytest
import torch

from conftest import CPU, model_of, read_metrics, read_summary
from dlrun import checkpoint
from dlrun.config.validate import validate
from dlrun.data import Augment, Augment1D, batch_generator, build_data, load_mnist1d, load_sequence
from dlrun.errors import ConfigError, Interrupted
from dlrun.train import Parts, StopFlag, fit
from test_train import Recorder, fit_config

SIGNALS = torch.randn(16, 2, 40, generator=torch.Generator().manual_seed(0))  # (B, C, L)


def test_shift_moves_each_sample_by_at_most_the_padding_with_zeros_shifted_in():
    out = Augment1D(crop_padding=3)(SIGNALS, batch_generator(0, 1, 0))
    assert out.shape == SIGNALS.shape and out.dtype == SIGNALS.dtype
    padded = torch.nn.functional.pad(SIGNALS, (3, 3))
    shifts = []
    for o, p in zip(out, padded):  # each output is one window of the padded input, the same for every channel
        found = [s for s in range(7) if torch.equal(o, p[:, s:s + 40])]
        assert len(found) == 1
        shifts.append(found[0] - 3)
    assert len(set(shifts)) > 3  # drawn per sample, in -3 .. 3
    first = shifts.index(next(s for s in shifts if s > 0))
    assert torch.equal(out[first, :, -shifts[first]:], torch.zeros(2, shifts[first]))  # zeros shifted in


def test_noise_is_gaussian_with_the_given_std():
    x = torch.zeros(64, 1, 500)
    out = Augment1D(noise=0.3)(x, batch_generator(0, 1, 0))
    assert out.shape == x.shape
    assert abs(out.std().item() - 0.3) < 0.01 and abs(out.mean().item()) < 0.01


@pytest.mark.parametrize("augment", [Augment1D(crop_padding=2), Augment1D(noise=0.1), Augment1D(2, 0.1)])
def test_augmentation_is_a_pure_function_of_seed_epoch_and_batch(augment):
    out = augment(SIGNALS, batch_generator(7, 3, 5))
    assert torch.equal(out, augment(SIGNALS, batch_generator(7, 3, 5)))  # same (seed, epoch, batch)
    assert not torch.equal(out, SIGNALS)
    for other in (batch_generator(7, 4, 5), batch_generator(7, 3, 6), batch_generator(8, 3, 5)):
        assert not torch.equal(out, augment(SIGNALS, other))  # another epoch, batch or seed


def test_zero_settings_leave_the_data_alone(data_dir):
    assert torch.equal(Augment1D()(SIGNALS, batch_generator(0, 1, 0)), SIGNALS)
    raw = load_mnist1d(str(data_dir), 1000, 0.8, 0.1, 0, 42)
    assert build_data(raw, torch.device("cpu")).augment is None
    raw.crop_padding, raw.augment_noise = 2, 0.1
    data = build_data(raw, torch.device("cpu"))
    assert data.augment == Augment1D(2, 0.1) and data.spec.input_shape == (1, 40)
    assert build_data(load_sequence(200, 30, 4, 2, 0.05, 0.1, 0.2, 0, augment_noise=0.2),
                      torch.device("cpu")).augment == Augment1D(0, 0.2)


@pytest.mark.parametrize("overrides, words", [
    (["dataset=mnist1d", "dataset.crop_padding=-1"], "dataset.crop_padding=-1 is invalid: must be >= 0"),
    (["dataset=mnist1d", "dataset.crop_padding=40"], "dataset.crop_padding=40 is invalid: must be < 40"),
    (["dataset=mnist1d", "dataset.augment_noise=-0.1"], "dataset.augment_noise=-0.1 is invalid: must be >= 0"),
    (["dataset=sequence", "dataset.augment_noise=-1"], "dataset.augment_noise=-1.0 is invalid: must be >= 0"),
    (["dataset=sequence", "dataset.crop_padding=2"], "dataset.crop_padding=2 is invalid for dataset=sequence: "
                                                     "a shifted input window predicts a different future"),
])
def test_bad_settings_are_refused_in_one_line(make_cfg, overrides, words):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*overrides))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_valid_settings_pass(make_cfg):
    validate(make_cfg("dataset=mnist1d", "dataset.crop_padding=39", "dataset.augment_noise=0.5"))
    validate(make_cfg("dataset=sequence", "dataset.augment_noise=0.1"))


def test_the_loaders_refuse_what_validation_refuses(data_dir):
    with pytest.raises(ConfigError, match="a shifted input window predicts a different future"):
        load_sequence(200, 30, 4, 2, 0.05, 0.1, 0.2, 0, crop_padding=1)
    with pytest.raises(ConfigError, match="dataset.crop_padding=40 is invalid: must be < 40"):
        build_data(load_mnist1d(str(data_dir), 1000, 0.8, 0.1, 0, 42, crop_padding=40), torch.device("cpu"))


def test_image_augmentation_is_unchanged_by_the_1d_one(data_dir):
    from dlrun.data import load_digits

    assert build_data(load_digits(0.2, 0.1, 0, crop_padding=1), torch.device("cpu")).augment == Augment(1, False)


def test_interrupted_mnist1d_run_with_augmentation_resumes_exactly(data_dir, tmp_path):
    """Stop mid-epoch, checkpoint, rebuild everything, continue: every epoch's metrics and the final
    weights equal those of the uninterrupted run, with shifts and noise on every training batch."""
    raw = load_mnist1d(str(data_dir), 1000, 0.8, 0.1, 0, 42, crop_padding=3, augment_noise=0.2)
    data = build_data(raw, torch.device("cpu"))  # 720 training samples: 12 steps of 64 per epoch
    cfg = fit_config(epochs=3, log_every=1)

    def build(seed=0):
        torch.manual_seed(seed)
        model = model_of("model=cnn", "model.channels=[8,8]", "model.hidden=16", "model.dropout=0.1",
                         shape=data.spec.input_shape)
        return Parts(model, torch.optim.Adam(model.parameters(), lr=3e-3))

    parts = build()
    straight = Recorder()
    fit(parts, data, cfg, [straight], lambda s, b: None)
    expected = {k: v.clone() for k, v in parts.model.state_dict().items()}

    parts, stop, path = build(), StopFlag(), tmp_path / "last.pt"
    first = Recorder(stop, stop_at=17)  # epoch 2, batch 5

    def save(state, is_best):
        checkpoint.save(checkpoint.training_checkpoint(parts, state), path)

    with pytest.raises(Interrupted):
        fit(parts, data, cfg, [first], save, stop=stop)
    parts = build(seed=123)
    state = checkpoint.restore_training(checkpoint.load(path), parts)
    assert (state.epoch, state.batch) == (1, 5)
    second = Recorder()
    fit(parts, data, cfg, [second], lambda s, b: None, state=state)
    assert first.records + second.records == straight.records
    assert all(torch.equal(v, expected[k]) for k, v in parts.model.state_dict().items())

    plain = build()  # and the augmentation did something
    fit(plain, build_data(load_mnist1d(str(data_dir), 1000, 0.8, 0.1, 0, 42), torch.device("cpu")), cfg,
        [], lambda s, b: None)
    assert any(not torch.equal(v, expected[k]) for k, v in plain.model.state_dict().items())


def test_mnist1d_run_with_augmentation_resumed_with_the_cli_equals_the_uninterrupted_one(cli, tmp_path):
    run = ["dataset=mnist1d", "dataset.num_samples=1000", "dataset.crop_padding=2", "dataset.augment_noise=0.1",
           "model.channels=[8,8]", "model.hidden=16", *CPU]
    cli("dlrun", "hydra.run.dir=short", *run, "trainer.epochs=2", check=True)
    cli("dlrun", "hydra.run.dir=long", *run, "trainer.epochs=4", check=True)
    cli("dlrun", "resume=short", "trainer.epochs=4", check=True)
    short, long = read_summary(tmp_path / "short"), read_summary(tmp_path / "long")
    assert short["epochs"] == 4 and short["final"] == long["final"] and short["best"] == long["best"]
    timing = {"seconds", "samples_per_s"}
    assert ([{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "short")]
            == [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "long")])
    got, want = (torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
                 for name in ("short", "long"))
    assert all(torch.equal(got[k], want[k]) for k in want)
