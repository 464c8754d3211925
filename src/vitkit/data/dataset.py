"""In-memory image datasets: uint8 image tensors plus targets, cheap to index and split."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageDataset:
    """Images held in memory as one uint8 tensor.

    Attributes:
        images: (N, C, H, W) uint8, C is 1 (grayscale) or 3 (RGB).
        targets: (N,) int64 class indices, (N, K) float32 multi-hot for multi-label data, or
            (N, H, W) int64 masks of class indices for dense tasks (255: ignore), or (N, M, 5) float32
            boxes ``[label, x0, y0, x1, y1]`` padded with label -1 for detection (``info["boxes"]``).
        classes: class names, index-aligned with the targets.
        info: source facts; ``info["pair"]`` marks image pairs stacked on the channel axis (change
            detection: ``(N, 2C, H, W)``, the first image's channels, then the second's);
            ``info["groups"]``, an (N,) int64 tensor, the group of each sample (a patient, the image
            a crop came from), which group-level evaluation aggregates over.
        name: the URI the data came from (for reports and error messages).
    """

    images: torch.Tensor
    targets: torch.Tensor
    classes: list[str]
    name: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.targets):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        return self.targets.ndim == 2

    @property
    def dense(self) -> bool:
        """Targets are per-pixel class masks (N, H, W)."""
        return self.targets.ndim == 3 and not self.boxes

    @property
    def boxes(self) -> bool:
        """Targets are padded boxes (N, M, 5) ``[label, x0, y0, x1, y1]`` (detection; data/boxes.py)."""
        return bool(self.info.get("boxes", False))

    @property
    def pair(self) -> bool:
        """Each sample is two images stacked on the channel axis (change detection)."""
        return bool(self.info.get("pair", False))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor | list[int], name: str | None = None) -> ImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        info = dict(self.info)
        if isinstance(info.get("groups"), torch.Tensor):  # per-sample group ids follow their samples
            info["groups"] = info["groups"][idx]
        return ImageDataset(self.images[idx], self.targets[idx], list(self.classes), name or self.name, info)

    def class_counts(self) -> list[int]:
        """Samples per class (for multi-label data: positives per class; for masks: pixels per class,
        ignored pixels left out)."""
        if not self.classes:  # image-caption pairs: their targets are caption ids, not classes
            return []
        if self.boxes:  # boxes per class
            labels = self.targets[..., 0].flatten()
            labels = labels[labels >= 0].long()
            return [int(c) for c in torch.bincount(labels, minlength=self.num_classes).tolist()]
        if self.multilabel:
            return [int(c) for c in self.targets.sum(0).tolist()]
        if self.dense:
            t = self.targets.flatten()
            t = t[(t >= 0) & (t < self.num_classes)]
            return [int(c) for c in torch.bincount(t, minlength=self.num_classes).tolist()]
        return [int(c) for c in torch.bincount(self.targets, minlength=self.num_classes).tolist()]

    def label_indices(self) -> torch.Tensor:
        """A single label per sample (the first positive for multi-label data; for masks the most
        frequent class other than class 0, the background, or 0 when there is none), for
        stratification."""
        if self.boxes:  # the class of the first box (0 for an image without any)
            return self.targets[:, 0, 0].clamp(min=0).long()
        if self.multilabel:
            return self.targets.argmax(1)
        if self.dense:
            k = self.num_classes
            t = self.targets.flatten(1)
            counts = torch.zeros(len(t), k + 1, dtype=torch.long)
            counts.scatter_add_(1, t.clamp(0, k), torch.ones_like(t))  # ignore (255) -> bin k
            fg = counts[:, 1:k]
            return torch.where(fg.sum(1) > 0, fg.argmax(1) + 1, 0)
        return self.targets


@dataclass
class DataSplits:
    """The splits a training run uses. ``val`` is what the loop evaluates each epoch."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset | None = None
    description: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def multilabel(self) -> bool:
        return self.train.multilabel
