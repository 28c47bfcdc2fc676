"""Model families. Classes take plain numbers; the data supplies the shapes (`in_shape`, `num_outputs`).

Their keyword defaults are the schema's (config/schema.py: CNNConfig, MLPConfig, RNNConfig,
ResNetConfig, TransformerConfig); tests/test_models.py fails if the two disagree.

Any `nn.Module` whose constructor accepts `in_shape` and `num_outputs` keyword
arguments can be named by `model._target_`; `build_model` supplies both. Every class is
importable as `dlrun.models.<Class>`, the name configs and checkpoints use.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

from omegaconf import DictConfig
from torch import nn

from dlrun.config.targets import instantiate_trusted
from dlrun.errors import ConfigError
from dlrun.models.cnn import CNN
from dlrun.models.mlp import MLP
from dlrun.models.resnet import ResNet
from dlrun.models.rnn import RNN
from dlrun.models.timm_model import TimmModel
from dlrun.models.transformer import Transformer

__all__ = ["CNN", "MLP", "RNN", "ResNet", "TimmModel", "Transformer", "build_model", "check_keys"]


def build_model(cfg: DictConfig, in_shape: Sequence[int], num_outputs: int, pretrained: bool = True) -> nn.Module:
    """`cfg._target_(in_shape=..., num_outputs=..., **keys)`; every key must be a constructor parameter.
    `pretrained=False`: a `model.pretrained` key is set to false (the weights come from a checkpoint: a resumed
    run, a loaded model), so that the pretrained file or download is not needed again."""
    factory = instantiate_trusted(cfg, cfg._target_, _partial_=True, _convert_="all")  # its own: see targets.py
    check_keys(factory.func, [k for k in cfg if k != "_target_"], "model")
    no_download = {} if pretrained or "pretrained" not in cfg else {"pretrained": False}
    return factory(in_shape=tuple(in_shape), num_outputs=num_outputs, **no_download)


def check_keys(constructor: Callable[..., Any], keys: list[str], group: str) -> None:
    """Config keys the constructor does not take are a clear error (as torchtune checks them), not a TypeError."""
    params = inspect.signature(constructor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    taken = [name for name in params if name not in ("in_shape", "num_outputs")]
    unknown = [k for k in keys if k not in params]
    if unknown:
        name = getattr(constructor, "__qualname__", str(constructor))
        raise ConfigError(f"{group}.{unknown[0]} is not a parameter of {name}; it takes: {', '.join(taken)}")

