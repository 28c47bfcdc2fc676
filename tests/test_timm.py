"""model=timm: timm's architectures for the data's channels and classes; pretrained weights from a file the test
writes (there is no network here), adapted by timm; trainer.freeze_epochs; runs load back without the file."""

from __future__ import annotations

import pytest
import torch

from conftest import CPU, read_summary
from dlrun.checkpoint import load_model

TIMM = ("model=timm", "model.name=test_resnet", "trainer.model_summary=false", *CPU)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """timm's test_resnet as released architectures are: 3 input channels, 1000 classes; its weights in a file."""
    import timm

    torch.manual_seed(123)
    model = timm.create_model("test_resnet")
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_a_timm_architecture_trains_on_the_datas_shape(cli, tmp_path):
    import timm

    cli("dlrun", "hydra.run.dir=run", "trainer.epochs=1", *TIMM, check=True)
    summary = read_summary(tmp_path / "run")
    expected = sum(p.numel() for p in timm.create_model("test_resnet", num_classes=10, in_chans=1).parameters())
    assert summary["model"] == {"class": "TimmModel", "parameters": {"total": expected, "trainable": expected}}
    assert summary["best"]["test/acc"] > 0.3  # it learns (10 classes: 0.1 by chance)


def test_pretrained_weights_from_a_file_and_a_frozen_backbone(cli, tmp_path, weights, monkeypatch):
    """The backbone starts from the file's weights, timm's first convolution summed over the RGB channels for the
    digits' one; frozen for every epoch, it ends as it began (batch-norm statistics aside), while the new
    10-class classifier trains. The run folder loads back after the file is gone."""
    path, released = weights
    cli("dlrun", "hydra.run.dir=run", f"model.pretrained={path}", "trainer.freeze_epochs=2", "trainer.epochs=2",
        *TIMM, check=True)
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    backbone = [k for k in released if not k.startswith("fc.") and "running" not in k and "num_batches" not in k]
    torch.testing.assert_close(trained["net.conv1.0.weight"], released["conv1.0.weight"].sum(1, keepdim=True))
    for key in backbone[1:]:
        assert torch.equal(trained[f"net.{key}"], released[key]), key
    assert trained["net.fc.weight"].shape == (10, 96)
    path.rename(path.with_suffix(".gone"))  # predict, export, resume: the weights come from the checkpoint
    try:
        model, _, _ = load_model(tmp_path / "run")
        assert torch.equal(model.state_dict()["net.fc.weight"], trained["net.fc.weight"])
        cli("dlrun", f"resume={tmp_path / 'run'}", "trainer.epochs=3", check=True)
    finally:
        path.with_suffix(".gone").rename(path)
    after = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(after["net.layer1.0.conv1.weight"], trained["net.layer1.0.conv1.weight"])  # unfrozen


@pytest.mark.parametrize("overrides, said", [
    (["model=timm", "model.name=test_resnett"], "model.name='test_resnett' is not an architecture timm knows; "
                                                "close: test_resnet"),
    (["model=timm", "model.name=test_resnet", "model.pretrained=/nonexistent.pth"],
     "model.pretrained='/nonexistent.pth' is invalid: must be false, true (timm's own weights) or a weights file"),
    (["trainer.freeze_epochs=2"], "trainer.freeze_epochs=2 is invalid: trains a pretrained model's classifier "
                                  "alone first: it needs model=timm"),
    (["model=timm", "model.name=test_resnet", "dataset=mnist1d"], "model='timm' is invalid: timm's architectures take "
                                                                  "images (C, H, W)"),
])
def test_bad_input_is_one_line(cli, tmp_path, overrides, said):
    ran = cli("dlrun", *overrides, *CPU)
    assert ran.returncode != 0 and said in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr


def test_pretrained_true_without_network_or_cache_says_how_to_get_the_weights(cli, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # as without a network (without the hub's retries: about 45 s) and with an empty cache; the hub reads its
    # settings at import, so they are set where it keeps them
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    ran = cli("dlrun", "model=timm", "model.name=resnet18", "model.pretrained=true", *CPU)
    assert ran.returncode != 0
    assert "model.pretrained=true: timm's weights for resnet18 are not in its cache and cannot be downloaded here" \
        in ran.stderr and "timm.create_model('resnet18', pretrained=True)" in ran.stderr, ran.stderr
