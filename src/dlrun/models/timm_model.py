"""`model=timm`: any of timm's architectures (`model.name`), built for the data's channels and classes, with
pretrained weights from a local file or timm's cache (`model.pretrained`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from dlrun.config.validate import check_timm_name
from dlrun.errors import ConfigError


class TimmModel(nn.Module):
    """`timm.create_model(name, num_classes=<the data's>, in_chans=<the data's channels>, drop_rate=...)` on
    (N, C, H, W) images. `pretrained`: false (random weights), a weights file (.safetensors, .pth or .bin: timm
    adapts the first convolution to the channels and drops a classifier of another size) or true (timm's own
    weights, from its cache or the Hugging Face Hub). `head_parameters` are the classifier's
    (trainer.freeze_epochs trains them alone)."""

    def __init__(self, in_shape: Sequence[int], num_outputs: int, name: str, pretrained: Union[bool, str] = False,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        import timm

        if len(in_shape) != 3:
            raise ConfigError(f"model=timm takes images (C, H, W); these inputs are {tuple(in_shape)}")
        check_timm_name(name)
        kwargs = {"num_classes": num_outputs, "in_chans": in_shape[0], "drop_rate": drop_rate}
        if not pretrained:
            self.net = timm.create_model(name, **kwargs)
            return
        overlay = {} if pretrained is True else {"file": str(Path(pretrained).expanduser().resolve())}
        try:
            self.net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except (OSError, RuntimeError) as err:  # no network and no cache (the hub's errors are OSErrors), a bad file
            raise ConfigError(pretrained_error(name, pretrained, err)) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.net.get_classifier().parameters())


def pretrained_error(name: str, pretrained: Union[bool, str], err: Exception) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if pretrained is not True:
        return f"model.pretrained={pretrained} cannot be loaded into timm's {name}: {first}"
    return (f"model.pretrained=true: timm's weights for {name} are not in its cache and cannot be downloaded here "
            f"({first}); on a connected machine, python -c \"import timm; timm.create_model('{name}', "
            "pretrained=True)\" fills the cache (~/.cache/huggingface), or give a file: model.pretrained=/path/to/"
            "weights.safetensors")
