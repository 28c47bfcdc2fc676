"""Training-time augmentation, batched on the device: crops and flips of images (`Augment`), shifts
and noise of signals and sequences (`Augment1D`). Every draw comes from a generator that is a pure
function of (seed, epoch, batch) (`batch_generator`), so a resumed run replays it exactly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dlrun.errors import ConfigError


@contextmanager
def global_rng_from(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Within the block, torch's global RNG (where torchvision's transforms draw) forked and seeded from
    `generator`: what is drawn there is a pure function of `generator`, and the RNG is as it was after the block
    (dropout's draws do not move)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding and horizontal flips, applied to a whole batch on its device; then, with
    `randaugment`, RandAugment (torchvision.transforms.v2, its defaults: 2 operations of magnitude 9) image by
    image, on the pixels (the normalised inputs back to 0..255 with `mean`, `std` and the raw scale's `top`)."""

    crop_padding: int = 0
    hflip: bool = False
    randaugment: bool = False
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    top: float = 255.0  # the raw data's largest value (255 for pixels, 16 for scikit-learn's digits)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape  # (B, C, H, W)
        if self.crop_padding:
            p = self.crop_padding
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            padded = torch.nn.functional.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
            batch = torch.arange(n, device=x.device)[:, None, None]
            x = padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous(memory_format=fmt)  # (B, C, H, W)
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.randaugment:
            x = self.rand_augment(x, generator)
        return x

    def rand_augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """RandAugment of each image, drawn under `global_rng_from(generator)`."""
        from torchvision.transforms import v2

        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        pixels = ((x * std + mean) * (255 / self.top)).round().clamp(0, 255).to(torch.uint8)  # (B, C, H, W)
        augment = v2.RandAugment()
        with global_rng_from(generator, x.device):
            pixels = torch.stack([augment(image) for image in pixels])
        return ((pixels.float() * (self.top / 255) - mean) / std).contiguous(memory_format=fmt)


@dataclass(frozen=True)
class Augment1D:
    """Random shifts with zero padding and additive Gaussian noise for signals and sequences (B, C, L),
    applied to a whole batch on its device: the 1-D counterpart of `Augment`'s crops.

    A shift by up to `crop_padding` steps either way is a crop of length L from the input padded with
    `crop_padding` zeros (the training mean, after normalisation) at both ends; `noise` is the std of
    the noise added to every value, in normalised units. Every draw comes from `generator`, so the
    result is a pure function of (input, generator) on any device.
    """

    crop_padding: int = 0
    noise: float = 0.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, length = x.shape  # (B, C, L)
        if self.crop_padding:
            p = self.crop_padding
            padded = torch.nn.functional.pad(x, (p, p))  # (B, C, L+2p)
            start = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            index = (start[:, None] + torch.arange(length, device=x.device))[:, None, :]  # (B, 1, L)
            x = padded.gather(2, index.expand(n, c, length))  # (B, C, L)
        if self.noise:
            # the noise is drawn on the batch's device, by a generator seeded from this batch's one
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            on_device = torch.Generator(device=x.device).manual_seed(seed)
            x = x + self.noise * torch.randn(x.shape, generator=on_device, device=x.device, dtype=x.dtype)
        return x


@dataclass(frozen=True)
class Mix:
    """MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a training batch, by torchvision.transforms.v2:
    each sample mixed with the next one in the batch (whose order is random), by a share drawn from
    Beta(alpha, alpha); labels become the mixed one-hot vectors (N, classes). With both on, one of them per batch.
    torchvision draws from torch's global RNG: here under `global_rng_from(generator)`, so the result is a pure
    function of (batch, generator) and the global RNG (dropout's) is left as it was."""

    mixup: float
    cutmix: float
    classes: int

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms import v2

        mixes = [v2.MixUp(alpha=self.mixup, num_classes=self.classes)] if self.mixup else []
        mixes += [v2.CutMix(alpha=self.cutmix, num_classes=self.classes)] if self.cutmix else []
        with global_rng_from(generator, x.device):
            mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
            if x.dim() == 3:  # (B, C, L) signals: MixUp as on (B, C, 1, L) images
                mixed, y = mix(x.unsqueeze(2), y)
                return mixed.squeeze(2), y
            return mix(x, y)


def build_mix(input_shape: tuple[int, ...], classes: int, task: str, mixup: float, cutmix: float) -> Mix | None:
    """trainer.mixup / trainer.cutmix for this data; None when both are off. Both mix class labels; CutMix cuts
    boxes out of images."""
    if (mixup or cutmix) and task != "classification":
        raise ConfigError(f"trainer.{'mixup' if mixup else 'cutmix'}={mixup or cutmix} is invalid: it mixes class "
                          f"labels, and this dataset is {task}")
    if cutmix and len(input_shape) != 3:
        raise ConfigError(f"trainer.cutmix={cutmix} is invalid: CutMix pastes boxes between images; these inputs are "
                          f"{tuple(input_shape)} signals or sequences (trainer.mixup works on them)")
    return Mix(mixup, cutmix, classes) if (mixup or cutmix) else None


def build_augment(input_shape: tuple[int, ...], data_name: str, crop_padding: int = 0, hflip: bool = False,
                  noise: float = 0.0, randaugment: bool = False, stats: tuple = ((), (), 255.0)) -> Augment | Augment1D | None:
    """Crops, flips and RandAugment for images (`stats`: the mean, std and top value RandAugment converts to pixels
    with); shifts and noise for signals and sequences (C, L); None when all are off."""
    if len(input_shape) == 2:
        if randaugment:
            raise ConfigError(f"dataset.augment=randaugment is invalid: RandAugment's operations are for images; the "
                              f"{data_name} inputs are signals or sequences (dataset.crop_padding and "
                              "augment_noise work on them)")
        length = input_shape[1]
        if crop_padding >= length:
            raise ConfigError(f"dataset.crop_padding={crop_padding} is invalid: must be < {length}, "
                              f"the length of the {data_name} signals")
        return Augment1D(crop_padding, noise) if (crop_padding or noise) else None
    if not (crop_padding or hflip or randaugment):
        return None
    mean, std, top = stats if randaugment else ((), (), 255.0)  # what RandAugment alone needs
    return Augment(crop_padding, hflip, randaugment, tuple(mean), tuple(std), top)


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The RNG that augments one batch: a pure function of (seed, epoch, batch), so resuming replays it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)

