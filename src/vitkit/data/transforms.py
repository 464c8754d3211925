"""Batch preprocessing and augmentation on in-memory uint8 tensors.

Everything runs on whole batches (resize, channel adaptation, random resized crop via
``affine_grid``, flips, normalization), so 2 CPU cores are not spent decoding images per sample.
RandAugment (timm's, PIL based) and timm's mixup/cutmix and random erasing are used when asked.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vitkit.data.dense import IGNORE_INDEX
from vitkit.errors import VitkitError

_RANDAUG = re.compile(r"rand(-(m|mstd|mmax|p)\d+(\.\d+)?|-(n|w)\d+|-inc[01])*")


@dataclass
class AugmentConfig:
    """Training augmentation. Defaults are mild: no flips (digits are not mirror-symmetric)."""

    scale: tuple[float, float] = (1.0, 1.0)  # random-resized-crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.0  # max shift as a fraction of the image side
    hflip: float = 0.0
    randaug: str | None = None  # timm string, e.g. "rand-m9-mstd0.5"
    mixup: float = 0.0  # mixup alpha
    cutmix: float = 0.0  # cutmix alpha
    mix_prob: float = 1.0
    reprob: float = 0.0  # random erasing probability

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


class BatchTransform:
    """uint8 (B, C, H, W) → normalized float (B, in_chans, img, img), with training augmentation.

    ``train=False`` is deterministic: resize, channel adaptation, normalization.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int],
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool = False,
        augment: AugmentConfig | None = None,
        num_classes: int = 0,
        label_smoothing: float = 0.0,
        multilabel: bool = False,
    ):
        self.size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        self.mean = torch.tensor(mean[:in_chans] if len(mean) >= in_chans else mean * in_chans).view(
            1, -1, 1, 1
        )
        self.std = torch.tensor(std[:in_chans] if len(std) >= in_chans else std * in_chans).view(1, -1, 1, 1)
        self.train = train
        self.aug = augment or AugmentConfig()
        self._randaug = None
        if train and self.aug.randaug:
            from timm.data.auto_augment import rand_augment_transform

            if not _RANDAUG.fullmatch(self.aug.randaug):
                raise VitkitError(
                    f"randaug: '{self.aug.randaug}' is not a timm RandAugment string (e.g. rand-m9-mstd0.5; sections m, n, mstd, mmax, inc, w, p)"
                )
            try:
                self._randaug = rand_augment_transform(
                    self.aug.randaug, {"translate_const": max(2, self.size[0] // 4)}
                )
            except (AssertionError, ValueError, KeyError) as e:
                raise VitkitError(
                    f"randaug: '{self.aug.randaug}' is not a timm RandAugment string (e.g. rand-m9-mstd0.5): {e}"
                ) from e
        self._mixup = None
        if train and self.aug.mixes:
            if multilabel:
                raise VitkitError(
                    "mixup/cutmix are for single-label data; turn them off for multi-label sets"
                )
            from timm.data import Mixup

            self._mixup = Mixup(
                mixup_alpha=self.aug.mixup,
                cutmix_alpha=self.aug.cutmix,
                prob=self.aug.mix_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self._erase = None
        if train and self.aug.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self._erase = RandomErasing(self.aug.reprob, mode="pixel", device="cpu")

    def set_mixup_enabled(self, enabled: bool) -> None:
        """Switch mixup/cutmix on or off (targets stay soft, one-hot when off), e.g. for the last epochs."""
        if self._mixup is not None:
            self._mixup.mixup_enabled = enabled

    def images(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 → normalized float; augmentation only when ``train``."""
        if self.train and self._randaug is not None:
            x = self._apply_randaug(x)
        x = x.float().div_(255.0)
        x = _adapt_channels(x, self.in_chans)
        if self.train:
            x = self._geometric(x, generator)
        elif tuple(x.shape[-2:]) != self.size:
            x = _resize(x, self.size)
        x = (x - self.mean) / self.std
        if self._erase is not None:
            x = self._erase(x)
        return x

    def __call__(
        self, x: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images(x, generator)
        if self._mixup is not None:
            if len(x) % 2:
                # timm's Mixup pairs samples with the reversed batch and needs an even size.
                x, targets = x[:-1], targets[:-1]
            x, targets = self._mixup(x, targets)
        return x, targets

    # -- pieces --------------------------------------------------------------------------------
    def _apply_randaug(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        out = []
        for img in x:
            arr = img.permute(1, 2, 0).numpy()
            pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            res = np.asarray(self._randaug(pil.convert("RGB")))
            if img.shape[0] == 1:
                res = res.mean(-1, keepdims=True).round().astype(np.uint8)
            out.append(torch.from_numpy(res).permute(2, 0, 1))
        return torch.stack(out)

    def _geometric(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        a = self.aug
        b = x.shape[0]
        crop = a.scale != (1.0, 1.0)
        if not crop and a.translate == 0:
            x = _resize(x, self.size) if tuple(x.shape[-2:]) != self.size else x
        else:
            # Random resized crop + translation as one affine resample per sample.
            area = torch.empty(b).uniform_(a.scale[0], a.scale[1], generator=g)
            log_r = torch.empty(b).uniform_(np.log(a.ratio[0]), np.log(a.ratio[1]), generator=g)
            ratio = torch.exp(log_r) if crop else torch.ones(b)
            sx = torch.sqrt(area * ratio).clamp(max=1.0)
            sy = torch.sqrt(area / ratio).clamp(max=1.0)
            tx = (torch.rand(b, generator=g) * 2 - 1) * (1 - sx + 2 * a.translate)
            ty = (torch.rand(b, generator=g) * 2 - 1) * (1 - sy + 2 * a.translate)
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, sy, tx, ty
            grid = F.affine_grid(theta, [b, x.shape[1], *self.size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if a.hflip > 0:
            flip = torch.rand(b, generator=g) < a.hflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


def _adapt_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    c = x.shape[1]
    if c == in_chans:
        return x
    if c == 1:
        return x.expand(-1, in_chans, -1, -1)
    if in_chans == 1:
        return x.mean(1, keepdim=True)
    raise VitkitError(f"cannot feed {c}-channel images to a model with {in_chans} input channels")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    down = size[0] < x.shape[-2]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (timm's mixup and RandAugment draw from the global RNGs)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def random_scale_crop(
    x: torch.Tensor, size: tuple[int, int], aug: AugmentConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Per sample a square scale-crop (area fraction in ``aug.scale``) anywhere inside the image, a
    shift (``aug.translate``) and a horizontal flip (``aug.hflip``), resampled bilinearly to ``size``.
    Returns the images, the sampling grid (for masks) and ``(s, tx, ty, flip)``: input coordinate =
    ``s * output + t`` on [-1, 1] axes, x mirrored where flipped (for boxes)."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(aug.scale[0], aug.scale[1], generator=generator)
    s = area.sqrt().clamp(max=1.0)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - s + 2 * aug.translate)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - s + 2 * aug.translate)
    flip = torch.rand(b, generator=generator) < aug.hflip
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -s, s)  # a mirrored x axis is the flip
    theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, tx, ty
    grid = F.affine_grid(theta, [b, 1, *size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x, grid, (s, tx, ty, flip)


class DenseBatchTransform:
    """Images and their masks together: uint8 (B, C, H, W) + int64 (B, H, W) → normalized float
    images and masks at ``img_size``, with the same geometric augmentation for both.

    Training draws a random scale-crop (area fraction in ``scale``, square, anywhere inside the
    image), a shift (``translate``) and a horizontal flip per sample, and resamples the image
    bilinearly and the mask by nearest neighbour (never a blend of two labels); pixels the shifted
    crop takes from outside the image are ``ignore_index`` in the mask. ``pair`` data (two images
    stacked on channels) moves both images as one. Evaluation resizes only (``images``); masks keep
    their resolution there and the task scores predictions at the mask's size.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int],
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool = False,
        augment: AugmentConfig | None = None,
        ignore_index: int = IGNORE_INDEX,
        pair: bool = False,
    ):
        self.size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        self.pair = pair
        one = BatchTransform(img_size, in_chans, mean, std)
        self.mean = one.mean.repeat(1, 2 if pair else 1, 1, 1)
        self.std = one.std.repeat(1, 2 if pair else 1, 1, 1)
        self.train = train
        self.aug = augment or AugmentConfig()
        self.ignore_index = ignore_index

    def set_mixup_enabled(self, enabled: bool) -> None:  # the loop's interface; masks are never mixed
        pass

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pair:
            return _adapt_channels(x, self.in_chans)
        c = x.shape[1] // 2
        return torch.cat(
            [_adapt_channels(x[:, :c], self.in_chans), _adapt_channels(x[:, c:], self.in_chans)], 1
        )

    def images(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self._channels(x.float().div_(255.0))
        if tuple(x.shape[-2:]) != self.size:
            x = _resize(x, self.size)
        return (x - self.mean) / self.std

    def __call__(
        self, x: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.train:
            return self.images(x), masks
        x, grid, _ = random_scale_crop(self._channels(x.float().div_(255.0)), self.size, self.aug, generator)
        # mask + 1, so the zero padding outside the image reads as "no label" (0 -> ignore)
        m = F.grid_sample(
            (masks + 1).float()[:, None], grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        m = m[:, 0].round().long() - 1
        m = torch.where(m < 0, self.ignore_index, m)
        return (x - self.mean) / self.std, m
