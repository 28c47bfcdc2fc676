"""Knowledge distillation (trainer.distill): Hinton's loss by the formula, alpha=0 is plain training bit
for bit, the teacher is recorded, and a teacher of other data or a regression run is one clear error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import CPU, read_summary
from dlrun.config.validate import validate
from dlrun.errors import ConfigError
from dlrun.losses import distill_loss
from dlrun.run import run

SMALL = [*CPU, "trainer.epochs=2"]
TEACHER = ("trainer.epochs=1", *CPU)  # the shared 1-epoch digits CNN
STUDENT = ("model.channels=[8,16]", *SMALL)


def test_the_loss_is_hintons_formula():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 4.0]])
    hard, t, alpha = torch.tensor(0.8), 4.0, 0.7

    def soft(row, temperature):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    kl = sum(sum(p * math.log(p / q) for p, q in zip(soft(tr, t), soft(sr, t)))
             for tr, sr in zip(teacher.tolist(), student.tolist())) / 2  # averaged over the batch
    expected = alpha * t * t * kl + (1 - alpha) * 0.8
    assert distill_loss(student, teacher, hard, t, alpha).item() == pytest.approx(expected, rel=1e-6)
    assert distill_loss(student, student, hard, t, 1.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.fixture
def teacher(trained) -> Path:
    return trained(*TEACHER)


@pytest.fixture
def plain(trained) -> Path:
    """The student trained without a teacher."""
    return trained(*STUDENT)


def test_alpha_zero_is_plain_training_bit_for_bit(make_cfg, tmp_path, teacher, plain):
    distilled = run(make_cfg(*STUDENT, f"trainer.distill.teacher={teacher}", "trainer.distill.alpha=0"),
                    run_dir=tmp_path / "alpha0")
    a = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "alpha0" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    undistilled = read_summary(plain)
    assert undistilled["best"] == distilled["best"] and undistilled["final"] == distilled["final"]
    # the teacher, evaluated once on the test split, is recorded with the student
    assert distilled["teacher"]["test/acc"] == read_summary(teacher)["best"]["test/acc"]
    assert distilled["teacher"]["parameters"] == read_summary(teacher)["model"]["parameters"]["total"]
    assert distilled["teacher"]["run_dir"] == str(teacher.resolve()) and "teacher" not in undistilled


def test_a_teacher_changes_the_student(make_cfg, tmp_path, teacher, plain):
    taught = run(make_cfg(*STUDENT, f"trainer.distill.teacher={teacher}", "trainer.distill.alpha=0.7",
                          "trainer.distill.temperature=4"), run_dir=tmp_path / "taught")
    assert taught["final"]["train/loss"] != read_summary(plain)["final"]["train/loss"]
    assert taught["teacher"]["alpha"] == 0.7 and taught["teacher"]["temperature"] == 4


def test_a_teacher_of_other_data_is_refused(make_cfg, tmp_path, teacher):
    cfg = make_cfg("dataset=mnist1d", "dataset.num_samples=600", *SMALL, f"trainer.distill.teacher={teacher}")
    with pytest.raises(ConfigError) as err:
        run(cfg, run_dir=tmp_path / "other")
    message = str(err.value)
    assert message.startswith(f"trainer.distill.teacher={teacher} is invalid: the teacher was trained on other data")
    assert "\n" not in message
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_a_regression_run_cannot_distill(make_cfg, tmp_path, teacher):
    cfg = make_cfg("dataset=sequence", "model=rnn", *SMALL, f"trainer.distill.teacher={teacher}",
                   "trainer.distill.temperature=2")
    with pytest.raises(ConfigError, match=r"is invalid: distillation needs a classification dataset "
                                          r"\(dataset=sequence is regression\)$"):
        run(cfg, run_dir=tmp_path / "regression")
    assert not (tmp_path / "regression" / "checkpoints").exists()


def test_a_refused_distillation_writes_nothing(cli, tmp_path):
    """From the command line, the refusals come before Hydra makes the run folder: one line, exit 1,
    nothing written (the teacher's dataset is read from its saved config, .hydra/config.yaml: so the
    teacher is made by the command too)."""
    teacher = tmp_path / "teacher"
    cli("dlrun", *SMALL, "trainer.epochs=1", f"hydra.run.dir={teacher}", check=True)
    for args, reason in (
        (["dataset=sequence", "model=rnn", "trainer.distill.temperature=2"],
         "distillation needs a classification dataset (dataset=sequence is regression)"),
        (["dataset=mnist1d"], "the teacher was trained on other data (dlrun.data.load_digits; the student's: "
                              "dlrun.data.load_mnist1d)"),
        (["trainer.distill.alpha=2"], "must be in [0, 1] (0 = plain training)"),
    ):
        ran = cli("dlrun", *SMALL, *args, f"trainer.distill.teacher={teacher}", cwd=tmp_path)
        assert ran.returncode == 1 and ran.stderr.strip().endswith(reason), ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no outputs/ folder


@pytest.mark.parametrize("change,expected", [
    ({"alpha": 1.5}, "trainer.distill.alpha=1.5 is invalid: must be in [0, 1] (0 = plain training)"),
    ({"temperature": 0.0}, "trainer.distill.temperature=0.0 is invalid: must be > 0"),
    ({"teacher": "/nonexistent/run"}, "trainer.distill.teacher='/nonexistent/run' is invalid: must be a finished "
                                      "dlrun run folder (with checkpoints/best.pt)"),
])
def test_bad_distill_settings(make_cfg, teacher, change, expected):
    cfg = make_cfg(f"trainer.distill.teacher={teacher}")
    for key, value in change.items():
        cfg.trainer.distill[key] = value
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == expected


def test_a_resumed_student_reloads_its_teacher(cli, tmp_path, teacher):
    args = ["model.channels=[8,16]", *CPU, f"trainer.distill.teacher={teacher}", "trainer.distill.alpha=0.7"]
    said = cli("dlrun", *args, "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'whole'}", check=True).stdout
    teacher_record = read_summary(tmp_path / "whole")["teacher"]
    assert (f"distilled from {teacher_record['run_dir']} ({teacher_record['parameters']:,} parameters, test/acc "
            f"{teacher_record['test/acc']:.4f}): train loss = 0.7·T²·KL(teacher ‖ student) + 0.3·cross-entropy, "
            "T = 4; val and test losses are plain cross-entropy") in said.splitlines()
    cli("dlrun", *args, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'part'}", check=True)
    cli("dlrun", f"resume={tmp_path / 'part'}", "trainer.epochs=2", check=True)
    whole, resumed = read_summary(tmp_path / "whole"), read_summary(tmp_path / "part")
    assert resumed["best"] == whole["best"] and resumed["teacher"] == whole["teacher"]
