"""Calibration sets for the guide's data rules (notebook 02): each a ``BatchesFn`` ``(num_batches, batch_size, seed)
-> list of normalized float [B, 3, H, W] batches`` built on :func:`calibkit.cifar.data.calibration_batches`
(inference preprocessing: ``normalize``), deterministic for a seed. See docs/methods.md#calibration-data.

* :func:`standard_batches` -- inference preprocessing with (``flip=True``, the kit's default) or without flips;
* :func:`mosaic_batches` -- 2x2 composites: four images, each resized to half height and width, tiled into one;
* :func:`augmented_batches` -- the training augmentation of notebook 01 (:func:`calibkit.cifar.train.augment`:
  random translation with reflect padding + flips) instead of inference preprocessing;
* :func:`noisy_batches` -- a fraction of the images with strong Gaussian pixel noise and a few saturated
  (salt-and-pepper, every pixel 0 or 255) outlier images.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from calibkit.checks import check_int, check_number
from calibkit.cifar.data import ImageTensors, calibration_batches, denormalize, normalize
from calibkit.cifar.train import augment

__all__ = ["to_uint8", "standard_batches", "mosaic", "mosaic_batches", "augmented_batches", "corrupt",
           "noisy_batches"]


def _check_data(data) -> ImageTensors:
    if not isinstance(data, ImageTensors):
        raise TypeError(f"data must be an ImageTensors dataset (calibkit.cifar.data.load_cifar10), got "
                        f"{type(data).__name__}")
    return data


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`~calibkit.cifar.data.normalize`: float ``[..., 3, H, W]`` -> ``uint8`` 0..255 (rounded; exact
    for normalized uint8 images)."""
    return (denormalize(x) * 255).round().clamp(0, 255).to(torch.uint8)


def standard_batches(data: ImageTensors, flip: bool = True, device=None):
    """The kit's calibration batches: inference preprocessing, each image mirrored with probability 1/2 if ``flip``."""
    _check_data(data)
    return lambda n, bs, seed: calibration_batches(data, n, bs, seed=seed, flip=flip, device=device)


def mosaic(images: torch.Tensor) -> torch.Tensor:
    """2x2 composites of ``uint8 [4k, C, H, W]`` images: images ``4i .. 4i+3`` resized (antialiased) to
    ``[H/2, W/2]`` and tiled top-left, top-right, bottom-left, bottom-right into image ``i`` of ``[k, C, H, W]``."""
    n, c, h, w = images.shape
    if n % 4 or h % 2 or w % 2:
        raise ValueError(f"images has shape {tuple(images.shape)}: need a multiple of 4 images of even height/width")
    small = TF.resize(images, [h // 2, w // 2], antialias=True).reshape(n // 4, 4, c, h // 2, w // 2)
    top = torch.cat([small[:, 0], small[:, 1]], dim=-1)
    bottom = torch.cat([small[:, 2], small[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def mosaic_batches(data: ImageTensors, device=None):
    """Batches of :func:`mosaic` composites of the kit's calibration images (flips on; ``4 x batch_size`` source
    images per batch), normalized."""
    get = standard_batches(data, True, device)
    return lambda n, bs, seed: [normalize(mosaic(to_uint8(x))) for x in get(n, 4 * bs, seed)]


def augmented_batches(data: ImageTensors, translate: int = 2, device=None):
    """The training augmentation instead of inference preprocessing: each image shifted by up to ``translate``
    pixels (reflect padding) and mirrored with probability 1/2 (:func:`calibkit.cifar.train.augment`, as notebook
    01 trains), drawn from a generator seeded with the batches' seed."""
    check_int("translate", translate, 0, 31)
    get = standard_batches(data, False, device)

    def batches(n, bs, seed):
        gen = torch.Generator().manual_seed(seed)
        return [normalize(augment(to_uint8(x), gen, flip=True, translate=translate)) for x in get(n, bs, seed)]
    return batches


def _check_noise(noise_fraction, noise_std, outlier_fraction) -> None:
    check_number("noise_fraction", noise_fraction, 0, 1)
    check_number("noise_std", noise_std, 0)
    check_number("outlier_fraction", outlier_fraction, 0, 1 - noise_fraction, why=" (with noise_fraction)")


def corrupt(images: torch.Tensor, generator: torch.Generator, noise_fraction: float = 0.1, noise_std: float = 0.5,
            outlier_fraction: float = 0.02) -> torch.Tensor:
    """Noisy copies of ``uint8 [N, C, H, W]`` images: each image independently gets, with probability
    ``noise_fraction``, Gaussian pixel noise of standard deviation ``noise_std`` (in units of the 0..255 range),
    else with probability ``outlier_fraction`` becomes a saturated outlier (every pixel 0 or 255 at random);
    results clamped to 0..255. All draws from ``generator`` (CPU)."""
    _check_noise(noise_fraction, noise_std, outlier_fraction)
    n = images.shape[0]
    u = torch.rand(n, generator=generator)
    noise = torch.randn(images.shape, generator=generator) * (255 * noise_std)
    salt = (torch.rand(images.shape, generator=generator) < 0.5).to(torch.float32) * 255
    x = images.to(torch.float32).cpu()
    noisy, outlier = (u < noise_fraction).view(-1, 1, 1, 1), (u >= 1 - outlier_fraction).view(-1, 1, 1, 1)
    x = torch.where(noisy, x + noise, torch.where(outlier, salt, x))
    return x.round().clamp(0, 255).to(torch.uint8).to(images.device)


def noisy_batches(data: ImageTensors, noise_fraction: float = 0.1, noise_std: float = 0.5,
                  outlier_fraction: float = 0.02, device=None):
    """The kit's calibration batches (flips on) with :func:`corrupt` applied, the draws seeded by the batches'
    seed; the same images as :func:`standard_batches` for that seed and batch size."""
    get = standard_batches(data, True, device)
    _check_noise(noise_fraction, noise_std, outlier_fraction)

    def batches(n, bs, seed):
        gen = torch.Generator().manual_seed(seed)
        return [normalize(corrupt(to_uint8(x), gen, noise_fraction, noise_std, outlier_fraction))
                for x in get(n, bs, seed)]
    return batches
