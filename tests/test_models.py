"""Builders give the right output shapes for every model on every dataset's DataSpec."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import model_of
from dlrun.errors import ConfigError
from dlrun.data import DataSpec
from dlrun.models import CNN, MLP, RNN, ResNet, Transformer, build_model
from dlrun.cost import count_parameters

SPECS = {
    "digits": DataSpec(input_shape=(1, 8, 8), num_outputs=10),
    "mnist1d": DataSpec(input_shape=(1, 40), num_outputs=10),
    "rgb32": DataSpec(input_shape=(3, 32, 32), num_outputs=100),
}


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize(
    "model_overrides",
    [
        ["model=cnn"],
        ["model=cnn", "model.pool=avg", "model.batch_norm=false", "model.hidden=0"],
        ["model=cnn", "model.pool=none", "model.kernel_size=5", "model.channels=[8,8,8]"],
        ["model=rnn"],
        ["model=rnn", "model.cell=gru", "model.bidirectional=true", "model.num_layers=2", "model.dropout=0.2"],
        ["model=rnn", "model.cell=rnn", "model.readout=mean"],
        ["model=rnn", "model.bidirectional=true", "model.readout=flatten"],
        ["model=mlp"],
        ["model=mlp", "model.hidden=[]", "model.batch_norm=false"],
    ],
)
def test_output_shape(make_cfg, spec_name, model_overrides):
    spec = SPECS[spec_name]
    model = build_model(make_cfg(*model_overrides).model, spec.input_shape, spec.num_outputs)
    out = model(torch.randn(5, *spec.input_shape))
    assert out.shape == (5, spec.num_outputs)


def test_cnn_parameter_count_by_hand():
    # conv(1->4, k3, no bias: BN follows) + BN(4) + conv(4->8, k3) + BN(8) + fc(8*2*2 -> 16) + fc(16 -> 10)
    model = CNN((1, 8, 8), 10, channels=[4, 8], kernel_size=3, pool="max", batch_norm=True, dropout=0.1, hidden=16,
                head="flatten", head_dropout=None)
    expected = (4 * 1 * 9) + 2 * 4 + (8 * 4 * 9) + 2 * 8 + (32 * 16 + 16) + (16 * 10 + 10)
    assert count_parameters(model) == {"total": expected, "trainable": expected}


def test_mlp_parameter_count_by_hand():
    model = MLP((1, 8, 8), 10, hidden=[16], batch_norm=True, dropout=0.1)
    assert count_parameters(model)["total"] == (64 * 16) + 2 * 16 + (16 * 10 + 10)
    logreg = MLP((1, 40), 10, hidden=[], batch_norm=False, dropout=0.0)
    assert count_parameters(logreg)["total"] == 40 * 10 + 10


def test_rnn_reads_images_row_by_row():
    model = RNN((2, 6, 5), 3, cell="gru", hidden_size=7, num_layers=1, bidirectional=False, dropout=0.0,
                readout="last")
    assert model.rnn.input_size == 2 * 5  # C * W features per row
    # gru: 3 gates * (input weights + hidden weights + 2 biases), then the head
    expected = 3 * (7 * 10 + 7 * 7 + 2 * 7) + (7 * 3 + 3)
    assert count_parameters(model)["total"] == expected


def test_an_rnn_reads_patches_of_steps_as_one_step():
    """model.patch_size=p: L/p steps of p*C features, the same GRU as on the signal cut into patches by hand; an image
    p rows at a time; parameters only grow by the input weights."""
    keys = dict(cell="gru", hidden_size=7, num_layers=1, bidirectional=True, dropout=0.0, readout="mean")
    model = RNN((2, 12), 3, **keys, patch_size=4)
    assert model.rnn.input_size == 4 * 2
    x = torch.randn(5, 2, 12)
    by_hand, _ = model.rnn(x.transpose(1, 2).reshape(5, 3, 8))
    assert torch.equal(model(x), model.head(by_hand.mean(1)))
    assert count_parameters(model)["total"] == count_parameters(RNN((2, 12), 3, **keys))["total"] + 2 * 3 * 7 * 6
    image = RNN((2, 6, 5), 3, **keys, patch_size=2)
    assert image.rnn.input_size == 2 * 2 * 5 and image(torch.randn(4, 2, 6, 5)).shape == (4, 3)


def test_an_rnn_saved_before_patch_size_existed_builds_as_it_was(make_cfg):
    saved = OmegaConf.to_container(make_cfg("model=rnn").model)
    del saved["patch_size"]
    model = build_model(OmegaConf.create(saved), (1, 40), 10)
    assert model.patch_size == 1 and model.rnn.input_size == 1


def test_cnn_that_pools_below_one_pixel_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.channels"):
        model_of("model.channels=[4,4,4,4]")


def test_user_module_by_target(make_cfg):
    cfg = make_cfg("model=cnn")
    cfg.model = {"_target_": "torch.nn.Bilinear", "in1_features": 3, "in2_features": 3, "out_features": 2}
    with pytest.raises(TypeError, match="in_shape"):
        build_model(cfg.model, SPECS["digits"].input_shape, SPECS["digits"].num_outputs)  # the contract: the class must accept in_shape and num_outputs


@pytest.mark.parametrize("names", [("cnn", "cnn_blocks"), ("mlp",), ("rnn",), ("resnet",), ("transformer",)])
def test_a_model_class_takes_its_schemas_keys_with_no_defaults_of_its_own(names):
    """Every default is declared once, in conf/: a class takes exactly the keys of its options' schemas (so each
    value a YAML sets reaches it) and repeats none of their values (but for the keys added since checkpoints were
    saved, whose default is the value of the model those checkpoints hold). The CNN's two forms (channels, kernel_size
    and pool for model=cnn; blocks for model=cnn_blocks) default to None: absent, the other form is given."""
    import dataclasses
    import inspect

    from dlrun.config.schema import GROUPS

    schemas = [GROUPS["model"][name] for name in names]
    model_class = {"cnn": CNN, "mlp": MLP, "rnn": RNN, "resnet": ResNet, "transformer": Transformer}[names[0]]
    signature = inspect.signature(model_class).parameters
    keys = {f.name for schema in schemas for f in dataclasses.fields(schema)} - {"_target_"}
    assert {s.default for schema in schemas for s in dataclasses.fields(schema) if s.name == "_target_"} == {
        f"dlrun.models.{model_class.__name__}"}
    assert set(signature) - {"in_shape", "num_outputs"} == keys
    either = {"channels", "kernel_size", "pool", "blocks"} if len(names) > 1 else set()
    added = ADDED_SINCE_CHECKPOINTS.get(names[0], set())
    assert {k for k in keys if signature[k].default is not inspect.Parameter.empty} == either | added
    assert all(signature[k].default is None for k in either)
    defaults = {f.name: f.default_factory() if callable(f.default_factory) else f.default
                for schema in schemas for f in dataclasses.fields(schema)}
    assert {k: signature[k].default for k in added} == {k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in defaults.items() if k in added}


# Keys added to a model after checkpoints of it were saved (whose configs lack them: a resumed run and load_model
# build the saved model section as it is): the class defaults to the schema's value, the model those checkpoints hold.
ADDED_SINCE_CHECKPOINTS = {"transformer": {"stem", "stem_kernel"}, "rnn": {"patch_size"}}


def test_a_key_the_model_does_not_take_is_named(make_cfg):
    cfg = make_cfg("+model.nonexistent_field=3")
    with pytest.raises(ConfigError, match=r"model.nonexistent_field is not a parameter of CNN; it takes: channels, kernel_size, pool, blocks, "):
        build_model(cfg.model, SPECS["digits"].input_shape, SPECS["digits"].num_outputs)
