"""The classic presets are the networks they claim (checked against the reference implementations),
every model family runs on every kind of data, and ResNet / Transformer train, resume and report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import CPU as CPU_ARGS
from conftest import loop_settings, model_of, read_summary
from dlrun import checkpoint
from dlrun.cost import count_parameters, flops_per_sample
from dlrun.data import DataSpec, build_data, load_digits
from dlrun.errors import ConfigError, Interrupted
from dlrun.models import CNN, RNN, ResNet, build_model
from dlrun.train import Parts, StopFlag, fit

CPU = torch.device("cpu")
MNIST = DataSpec(input_shape=(1, 28, 28), num_outputs=10)


def same_network(model: nn.Module, reference: nn.Module, in_shape) -> None:
    """Equal parameter counts, and with the reference's weights copied in (in order), the same outputs."""
    assert count_parameters(model) == count_parameters(reference)
    mine, theirs = list(model.parameters()), list(reference.parameters())
    assert [p.shape for p in mine] == [p.shape for p in theirs]
    with torch.no_grad():
        for p, q in zip(mine, theirs, strict=True):
            p.copy_(q)
    model.eval(), reference.eval()
    x = torch.randn(3, *in_shape)
    assert model(x).shape == reference(x).shape == (3, 10)
    torch.testing.assert_close(model(x), reference(x))


def dropouts(model: nn.Module) -> list[tuple[str, float]]:
    return [(type(m).__name__, m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


# ------------------------------------------------------------------ classic presets


def test_the_keras_mnist_cnn_preset_is_the_keras_example(make_cfg):
    """keras.io/examples/vision/mnist_convnet, written out in PyTorch."""
    reference = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(64 * 5 * 5, 10),
    )
    model = build_model(make_cfg("experiment=mnist_keras_cnn").model, MNIST.input_shape, MNIST.num_outputs)
    assert count_parameters(model)["total"] == 34_826
    same_network(model, reference, (1, 28, 28))
    assert dropouts(model) == [("Dropout", 0.5)]
    assert isinstance(model.head.net[-2], nn.Dropout)  # right before the dense layer


class PyTorchExampleNet(nn.Module):
    """pytorch/examples, mnist/main.py, as published."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def test_the_mnist_cnn_preset_is_pytorchs_mnist_example(make_cfg):
    cfg = make_cfg("experiment=mnist_cnn")
    model = build_model(cfg.model, MNIST.input_shape, MNIST.num_outputs)
    reference = PyTorchExampleNet()
    assert count_parameters(model) == count_parameters(reference)
    assert count_parameters(model)["total"] == 1_199_882
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.copy_(q)
    model.eval(), reference.eval()
    x = torch.randn(4, 1, 28, 28)
    assert model(x).shape == reference(x).shape == (4, 10)
    # the example outputs log-probabilities; dlrun's model logits (its loss applies the softmax)
    torch.testing.assert_close(F.log_softmax(model(x), dim=1), reference(x))
    # dropout 0.25 after the pool (before flatten), 0.5 between fc1 and fc2, element-wise as in the example
    assert dropouts(model) == [("Dropout", 0.25), ("Dropout", 0.5)]
    assert isinstance(model.features[-1], nn.Dropout) and isinstance(model.head.net[-2], nn.Dropout)
    # and the example's training setting
    assert cfg.optimizer._target_ == "torch.optim.Adadelta" and cfg.optimizer.lr == 1.0
    assert (cfg.scheduler.step_epochs, cfg.scheduler.gamma, cfg.trainer.epochs, cfg.trainer.batch_size) == (1, 0.7, 14, 64)


def test_the_sequence_rnn_preset_is_a_simple_rnn_of_64_units(make_cfg):
    cfg = make_cfg("experiment=sequence_rnn")
    assert cfg.dataset._target_ == "dlrun.data.load_sequence"
    spec = DataSpec(input_shape=(1, cfg.dataset.length), num_outputs=cfg.dataset.horizon, task="regression")
    model = build_model(cfg.model, spec.input_shape, spec.num_outputs)
    rnn, head = nn.RNN(1, 64, batch_first=True), nn.Linear(64, 5)  # tanh, one layer
    assert count_parameters(model)["total"] == count_parameters(rnn)["total"] + count_parameters(head)["total"] == 4_613
    with torch.no_grad():
        for p, q in zip(model.parameters(), [*rnn.parameters(), *head.parameters()]):
            p.copy_(q)
    x = torch.randn(3, 1, 50)
    torch.testing.assert_close(model(x), head(rnn(x.transpose(1, 2))[0][:, -1]))


# ------------------------------------------------------------------ every model, every kind of data


def transformer(in_shape, outputs=10, **keys):
    """model=transformer with `keys` changed (every other value from conf/model/transformer.yaml)."""
    return model_of("model=transformer", *(f"model.{k}={v}" for k, v in keys.items()), shape=in_shape, outputs=outputs)


def resnet(in_shape, outputs=10, **keys):
    return model_of("model=resnet", *(f"model.{k}={v}" for k, v in keys.items()), shape=in_shape, outputs=outputs)


SPECS = {
    "image (1, 8, 8)": DataSpec(input_shape=(1, 8, 8), num_outputs=10),
    "image (3, 32, 32)": DataSpec(input_shape=(3, 32, 32), num_outputs=100),
    "signal (1, 40)": DataSpec(input_shape=(1, 40), num_outputs=10),
    "sequence regression (1, 50)": DataSpec(input_shape=(1, 50), num_outputs=5, task="regression"),
}
MODELS = [
    ["model=cnn"],
    ["model=cnn_blocks", "model.blocks=[{channels:8,kernel:3,padding:valid,stride:2},{channels:16,pool:avg,dropout:0.2}]",
     "model.head=avg", "model.hidden=[16,8]", "model.head_dropout=0.3"],
    ["model=mlp"],
    ["model=rnn"],
    ["model=rnn", "model.cell=gru", "model.patch_size=2", "model.readout=flatten"],
    ["model=resnet", "model.depth=8", "model.width=4"],
    ["model=resnet"],
    ["model=transformer", "model.d_model=16", "model.heads=2", "model.ff_dim=32"],
    ["model=transformer", "model.readout=cls", "model.positional=sinusoidal", "model.layers=1"],
    ["model=transformer", "model.stem=[8,16]", "model.stem_kernel=3", "model.d_model=16", "model.heads=2"],
]


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("overrides", MODELS, ids=lambda o: " ".join(o))
def test_every_model_on_every_kind_of_data(make_cfg, spec_name, overrides):
    spec = SPECS[spec_name]
    model = build_model(make_cfg(*overrides).model, spec.input_shape, spec.num_outputs)
    out = model(torch.randn(4, *spec.input_shape))
    assert out.shape == (4, spec.num_outputs) and torch.isfinite(out).all()
    out.sum().backward()  # every parameter takes part (DDP needs it)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("in_shape,patch,tokens", [((1, 40), 0, 40), ((1, 40), 4, 10), ((3, 32, 32), 0, 32),
                                                    ((3, 32, 32), 8, 16), ((1, 8, 8), 2, 16)])
def test_transformer_tokens(in_shape, patch, tokens):
    model = transformer(in_shape, d_model=8, heads=2, ff_dim=16, patch_size=patch)
    assert model.pos.shape == (1, tokens, 8)
    assert model(torch.randn(2, *in_shape)).shape == (2, 10)
    cls = transformer(in_shape, d_model=8, heads=2, ff_dim=16, patch_size=patch, readout="cls", positional="sinusoidal")
    assert cls.pos.shape == (1, tokens + 1, 8) and "pos" not in cls.state_dict()  # the fixed table is not saved


@pytest.mark.parametrize("make,shape", [
    (lambda: resnet((1, 8, 8), depth=8, width=8), (1, 8, 8)),
    (lambda: transformer((1, 8, 8), d_model=16, heads=2, ff_dim=16), (1, 8, 8)),  # a token per row
    (lambda: transformer((3, 16, 16), d_model=16, heads=2, ff_dim=16, patch_size=4), (3, 16, 16)),
], ids=["resnet", "transformer rows", "transformer patches"])
def test_bf16_channels_last_gives_the_fp32_outputs(make, shape):
    """What trainer.channels_last (null: NHWC for 2-D convolutions on the CPU) and precision=bf16 run.
    oneDNN's bf16 NHWC kernel for a (1, W) convolution over one channel returns wrong values here,
    which is why image rows are embedded by a linear layer."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(16, *shape)
    want = model(x)
    model = model.to(memory_format=torch.channels_last)
    for _ in range(3):  # the wrong kernel's values changed from call to call
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x.contiguous(memory_format=torch.channels_last)).float()
        torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


# ------------------------------------------------------------------ by hand


def test_resnet20_has_the_papers_parameter_count():
    """He et al. 2016 (section 4.2): ResNet-20 on CIFAR-10 has 0.27M parameters with option-A shortcuts."""
    model = ResNet((3, 32, 32), 10, depth=20, width=16)  # every key of the class, as model=resnet gives them
    conv = lambda i, o: i * o * 9  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    stem = conv(3, 16) + bn(16)
    stage1 = 3 * (2 * conv(16, 16) + 2 * bn(16))
    stage2 = conv(16, 32) + conv(32, 32) + 2 * bn(32) + 2 * (2 * conv(32, 32) + 2 * bn(32))
    stage3 = conv(32, 64) + conv(64, 64) + 2 * bn(64) + 2 * (2 * conv(64, 64) + 2 * bn(64))
    assert count_parameters(model)["total"] == stem + stage1 + stage2 + stage3 + 64 * 10 + 10 == 269_722
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == 20
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_shortcut_pads_new_channels_with_zeros():
    model = ResNet((2, 9), 3, depth=8, width=4)
    block = model.blocks[1]  # 4 -> 8 channels, stride 2
    x = torch.randn(2, 4, 9)
    short = block.shortcut(x)
    assert short.shape == (2, 8, 5)
    torch.testing.assert_close(short[:, 2:6], x[:, :, ::2])
    assert short[:, :2].abs().sum() == 0 and short[:, 6:].abs().sum() == 0


def transformer_flops(tokens, features, d, layers, ff, outputs):
    """Forward FLOPs of the Transformer by hand: (embedding, per layer qkv / proj / ff, head) and attention."""
    dense = 2 * tokens * features * d + layers * 2 * tokens * (3 * d * d + d * d + 2 * d * ff) + 2 * d * outputs
    attention = layers * 2 * (2 * tokens * tokens * d)  # q k^T and attention x v, over all heads
    return dense, attention


def test_transformer_parameter_count_by_hand():
    d, ff, layers, tokens = 16, 32, 2, 40
    model = transformer((1, tokens), d_model=d, heads=2, layers=layers, ff_dim=ff)
    per_layer = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
    expected = (1 * d + d) + tokens * d + layers * per_layer + 2 * d + (d * 10 + 10)
    assert count_parameters(model)["total"] == expected


def test_transformer_dense_flops_are_counted():
    model = transformer((1, 40), d_model=16, heads=2, layers=2, ff_dim=32)
    dense, attention = transformer_flops(40, 1, 16, 2, 32, 10)
    assert flops_per_sample(model, (1, 40), CPU) in (dense, dense + attention)


def test_a_stem_keeps_the_sizes_and_its_convolutions_are_counted():
    """model.stem: "same" convolutions before the tokens (batch norm, ReLU): the token count is the data's, the
    parameters and FLOPs grow by the convolutions' by hand (the embedding now reads the last width's channels)."""
    d, ff, layers, tokens, k = 16, 32, 2, 40, 5
    plain = transformer((1, tokens), d_model=d, heads=2, layers=layers, ff_dim=ff)
    model = transformer((1, tokens), d_model=d, heads=2, layers=layers, ff_dim=ff, stem=[4, 8], stem_kernel=k)
    assert model.pos.shape == plain.pos.shape == (1, tokens, d)
    convs = 1 * 4 * k + 4 * 8 * k  # no biases: batch norm follows
    embedding = (8 - 1) * d  # 8 channels instead of 1 per token
    assert count_parameters(model)["total"] == count_parameters(plain)["total"] + convs + 2 * (4 + 8) + embedding
    assert flops_per_sample(model, (1, tokens), CPU) == flops_per_sample(plain, (1, tokens), CPU) + \
        2 * tokens * convs + 2 * tokens * embedding
    image = transformer((3, 8, 8), d_model=d, heads=2, ff_dim=ff, stem=[4], stem_kernel=3, patch_size=2)
    assert image.stem[0].weight.shape == (4, 3, 3, 3) and image.pos.shape == (1, 16, d)


def test_a_transformer_saved_before_the_stem_existed_builds_as_it_was(make_cfg):
    """A checkpoint's config from before model.stem has no stem keys: it builds the model it holds (no stem)."""
    saved = OmegaConf.to_container(make_cfg("model=transformer").model)
    del saved["stem"], saved["stem_kernel"]
    model = build_model(OmegaConf.create(saved), (1, 40), 10)
    assert len(model.stem) == 0
    assert model.state_dict().keys() == transformer((1, 40)).state_dict().keys()


def test_transformer_attention_flops_are_counted():
    model = transformer((1, 40), d_model=16, heads=2, layers=2, ff_dim=32)
    assert flops_per_sample(model, (1, 40), CPU) == sum(transformer_flops(40, 1, 16, 2, 32, 10))


# ------------------------------------------------------------------ one-line errors


BLOCK = {"channels": 4, "kernel": 3, "stride": 1, "padding": "same", "pool": "none", "pool_size": 2, "dropout": 0.0}
HEAD = {"batch_norm": True, "dropout": 0.1, "hidden": 128, "head": "flatten", "head_dropout": None}


@pytest.mark.parametrize("blocks,message", [
    ([{**BLOCK, "kernel": 5, "padding": "valid"}] * 2,
     r"model.blocks\[1\] \(kernel 5, padding valid, stride 1\) gets an input of \(4, 4\) from the data's \(1, 8, 8\)"),
    ([{**BLOCK, "pool": "max", "pool_size": 3}] * 2,
     r"model.blocks\[1\] pools an input of \(2, 2\) \(from the data's \(1, 8, 8\)\) with pool_size 3"),
    ([{**BLOCK, "kernal": 3}], r"model.blocks\[0\].kernal is not a block key; allowed: channels, "),
    ([{**BLOCK, "padding": "full"}], r"model.blocks\[0\].padding='full' is invalid; allowed: same, valid"),
    ([{"channels": 4}], r"model.blocks\[0\] names no kernel, stride, padding, pool, pool_size, dropout"),
])
def test_a_block_that_leaves_nothing_is_named(blocks, message):
    """What the class itself refuses (a composed config has every key of a block; these come from Python)."""
    with pytest.raises(ConfigError, match=message):
        CNN((1, 8, 8), 10, blocks=blocks, **HEAD)


def test_a_patch_that_does_not_divide_the_input_is_named():
    with pytest.raises(ConfigError, match=r"model.patch_size=3 does not divide the input size \(8, 8\)"):
        transformer((1, 8, 8), patch_size=3)
    with pytest.raises(ConfigError, match=r"model.patch_size=3 does not divide the 40 steps of the input \(1, 40\)"):
        RNN((1, 40), 10, cell="gru", hidden_size=4, num_layers=1, bidirectional=False, dropout=0.0, readout="last",
            patch_size=3)


@pytest.mark.parametrize("overrides,message", [
    (["model=cnn_blocks", "model.blocks=[{channels:8,stride:0}]"],
     r"model.blocks\[0\].stride=0 is invalid: must be a positive integer"),
    (["model=cnn_blocks", "model.blocks=[{channels:8,dropout:1.0}]"],
     r"model.blocks\[0\].dropout=1.0 is invalid: must be in \[0, 1\)"),
    (["model.head_dropout=1.5"], r"model.head_dropout=1.5 is invalid"),
    (["model.hidden=-2"], "model.hidden=-2 is invalid: must be a width >= 0"),
    (["model=resnet", "model.depth=18"], r"model.depth=18 is invalid: must be 6n \+ 2"),
    (["model=transformer", "model.heads=3"], "model.d_model=64 is invalid: must be a multiple of model.heads=3"),
    (["model=transformer", "model.patch_size=-1"], "model.patch_size=-1 is invalid"),
    (["model=transformer", "model.stem=[8,0]"], r"model.stem=\[8, 0\] is invalid: must be a list of positive widths"),
    (["model=transformer", "model.stem_kernel=0"], "model.stem_kernel=0 is invalid: must be a positive integer"),
    (["model=rnn", "model.patch_size=0"], "model.patch_size=0 is invalid: must be a positive integer"),
])
def test_bad_model_keys_are_refused_before_training(make_cfg, overrides, message):
    from dlrun.config.validate import validate

    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*overrides))


# ------------------------------------------------------------------ trainer features and resume


@pytest.fixture(scope="module")
def digits():
    return build_data(load_digits(0.2, 0.1, 0), CPU)


def small(name, spec):
    torch.manual_seed(0)
    if name == "resnet":
        return resnet(spec.input_shape, depth=8, width=4)
    return transformer(spec.input_shape, d_model=16, heads=2, layers=1, ff_dim=16, dropout=0.2, readout="cls")


class StopAt:
    """A sink that raises the stop flag at one step (what run.py's SIGTERM handler does)."""

    def __init__(self, stop, at):
        self.stop, self.at, self.records = stop, at, []

    def start(self, *a):
        pass

    def step(self, epoch, step, loss, samples_per_s):
        if step == self.at:
            import signal

            self.stop.signum = signal.SIGTERM

    def epoch(self, record):
        self.records.append({k: v for k, v in record.items() if k not in ("seconds", "samples_per_s")})

    def close(self, summary):
        pass


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_interrupt_and_resume_is_exact(digits, tmp_path, name):
    """Stopped at step 13 of 40, checkpointed, rebuilt and continued: the weights and metrics of the
    uninterrupted run (batch norm for the ResNet, dropout for the Transformer)."""
    settings = loop_settings("classification", epochs=2, batch_size=64, eval_batch_size=256, seed=0, eval_every=1,
                             log_every=1, monitor="val/acc", monitor_mode="max")

    def parts(seed=0):
        model = small(name, digits.spec)
        return Parts(model, torch.optim.Adam(model.parameters(), lr=3e-3), None)

    straight_parts, straight = parts(), StopAt(None, -1)
    fit(straight_parts, digits, settings, [straight], lambda s, b: None)

    first_parts, stop = parts(), StopFlag()
    first = StopAt(stop, 13)
    path = tmp_path / "last.pt"
    with pytest.raises(Interrupted):
        fit(first_parts, digits, settings, [first],
            lambda s, b: checkpoint.save(checkpoint.training_checkpoint(first_parts, s), path), stop=stop)
    torch.manual_seed(123)
    resumed = parts()
    state = checkpoint.restore_training(checkpoint.load(path), resumed)
    second = StopAt(None, -1)
    fit(resumed, digits, settings, [second], lambda s, b: None, state=state)
    assert first.records + second.records == straight.records
    want = straight_parts.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.model.state_dict().items())


@pytest.mark.parametrize("overrides", [
    ["model=resnet", "model.depth=8", "model.width=4", "trainer.channels_last=true"],
    ["model=transformer", "model.d_model=16", "model.heads=2", "model.ff_dim=16", "model.readout=cls"],
])
def test_bf16_ema_and_accumulation_run(make_cfg, tmp_path, overrides):
    cfg = make_cfg(*overrides, "trainer.epochs=1", "trainer.limit_train_batches=4", "trainer.precision=bf16",
                   "trainer.ema_decay=0.9", "trainer.accumulate=2", "trainer.monitor=val_ema/acc",
                   "device=cpu", "logger.tensorboard=false")
    from dlrun.run import run

    summary = run(cfg, run_dir=tmp_path)
    assert summary["status"] == "completed"
    assert math.isfinite(summary["final"]["test/loss"]) and 0 <= summary["final"]["test_ema/acc"] <= 1
    assert summary["cost"]["flops_per_sample"] > 0
    assert summary["model"]["parameters"] == count_parameters(build_model(cfg.model, (1, 8, 8), 10))


# ------------------------------------------------------------------ the command


@pytest.mark.parametrize("overrides,shape,chance", [
    (["model=resnet", "dataset=digits", "trainer.epochs=2"], (1, 8, 8), 0.1),
    (["model=transformer", "dataset=mnist1d", "trainer.epochs=3", "optimizer.lr=3e-3"], (1, 40), 0.1),
])
def test_cli_run(cli, make_cfg, tmp_path, overrides, shape, chance):
    ran = cli("dlrun", *overrides, *CPU_ARGS, "logger.tensorboard=false", "hydra.run.dir=run")
    assert ran.returncode == 0, ran.stderr
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "completed"
    acc = summary["final"]["test/acc"]
    assert isinstance(acc, float) and acc > 2 * chance, acc
    assert summary["model"]["parameters"] == count_parameters(build_model(make_cfg(*overrides).model, shape, 10))
