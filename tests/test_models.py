"""Builders give the right output shapes for every model on every dataset's DataSpec."""

from __future__ import annotations

import pytest
import torch

from dlrun.errors import ConfigError
from dlrun.data import DataSpec
from dlrun.models import CNN, MLP, RNN, ResNet, Transformer, build_model, count_parameters

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
    model = build_model(make_cfg(*model_overrides).model, spec)
    out = model(torch.randn(5, *spec.input_shape))
    assert out.shape == (5, spec.num_outputs)


def test_cnn_parameter_count_by_hand():
    # conv(1->4, k3, no bias: BN follows) + BN(4) + conv(4->8, k3) + BN(8) + fc(8*2*2 -> 16) + fc(16 -> 10)
    model = CNN((1, 8, 8), 10, channels=[4, 8], kernel_size=3, pool="max", batch_norm=True, hidden=16)
    expected = (4 * 1 * 9) + 2 * 4 + (8 * 4 * 9) + 2 * 8 + (32 * 16 + 16) + (16 * 10 + 10)
    assert count_parameters(model) == {"total": expected, "trainable": expected}


def test_mlp_parameter_count_by_hand():
    model = MLP((1, 8, 8), 10, hidden=[16], batch_norm=True)
    assert count_parameters(model)["total"] == (64 * 16) + 2 * 16 + (16 * 10 + 10)
    logreg = MLP((1, 40), 10, hidden=[], batch_norm=False)
    assert count_parameters(logreg)["total"] == 40 * 10 + 10


def test_rnn_reads_images_row_by_row():
    model = RNN((2, 6, 5), 3, cell="gru", hidden_size=7)
    assert model.rnn.input_size == 2 * 5  # C * W features per row
    # gru: 3 gates * (input weights + hidden weights + 2 biases), then the head
    expected = 3 * (7 * 10 + 7 * 7 + 2 * 7) + (7 * 3 + 3)
    assert count_parameters(model)["total"] == expected


def test_cnn_that_pools_below_one_pixel_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.channels"):
        CNN((1, 8, 8), 10, channels=[4, 4, 4, 4])


def test_user_module_by_target(make_cfg):
    cfg = make_cfg("model=cnn")
    cfg.model = {"_target_": "torch.nn.Bilinear", "in1_features": 3, "in2_features": 3, "out_features": 2}
    with pytest.raises(TypeError, match="in_shape"):
        build_model(cfg.model, SPECS["digits"])  # the contract: the class must accept in_shape and num_outputs


@pytest.mark.parametrize("name", ["cnn", "mlp", "rnn", "resnet", "transformer"])
def test_schema_defaults_are_the_constructor_defaults(name):
    """Every default is declared in the schema and repeated in the class signature (so the classes
    work from Python alone); the two must never disagree."""
    import dataclasses
    import inspect

    from dlrun.config.schema import GROUPS

    schema = GROUPS["model"][name]
    model_class = {"cnn": CNN, "mlp": MLP, "rnn": RNN, "resnet": ResNet, "transformer": Transformer}[name]
    signature = inspect.signature(model_class).parameters
    for f in dataclasses.fields(schema):
        if f.name == "_target_":
            assert f.default == f"dlrun.models.{model_class.__name__}"
            continue
        declared = f.default_factory() if f.default is dataclasses.MISSING else f.default
        in_code = signature[f.name].default  # a schema key the constructor does not take fails here
        declared = declared.value if hasattr(declared, "value") else declared  # enums are str-valued
        assert list(in_code) == declared if isinstance(declared, list) else in_code == declared, (name, f.name)
    assert set(signature) - {f.name for f in dataclasses.fields(schema)} == {"in_shape", "num_outputs"}


def test_a_key_the_model_does_not_take_is_named(make_cfg):
    cfg = make_cfg("+model.nonexistent_field=3")
    with pytest.raises(ConfigError, match=r"model.nonexistent_field is not a parameter of CNN; it takes: channels, "):
        build_model(cfg.model, SPECS["digits"])
