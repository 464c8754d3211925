"""Deterministic train/val splits, long-tail subsampling and size limits."""

from __future__ import annotations

import math
import warnings

import torch

from vitkit.data.dataset import DataSplits, ImageDataset
from vitkit.data.sources import VitkitDataWarning, _show, build_mosaic
from vitkit.data.uris import load_source, parse_uri
from vitkit.errors import VitkitError


def stratified_split(data: ImageDataset, val_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Hold out ``val_fraction`` of every class (at least one sample per class with ≥ 2 samples)."""
    if not 0.0 < val_fraction < 1.0:
        raise VitkitError(f"val_fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    labels = data.label_indices()
    train_idx, val_idx = [], []
    for c in range(data.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    return data.subset(tr), data.subset(va)


def longtail_counts(counts: list[int], imbalance: float) -> list[int]:
    """Exponential profile of CIFAR-10-LT / DeiT-LT: class r keeps n_max · ρ^(−r/(C−1)) samples."""
    c = len(counts)
    n_max = max(counts)
    return [
        min(counts[r], int(n_max * imbalance ** (-r / (c - 1)))) if c > 1 else counts[r] for r in range(c)
    ]


def longtail_subset(data: ImageDataset, imbalance: float, seed: int) -> ImageDataset:
    """Subsample ``data`` so class 0 is the head and class C−1 has ``n_max/imbalance`` samples."""
    if data.multilabel:
        raise VitkitError("--longtail needs single-label data")
    if imbalance < 1:
        raise VitkitError(f"longtail imbalance factor must be ≥ 1 (n_max / n_min), got {imbalance}")
    target = longtail_counts(data.class_counts(), imbalance)
    g = torch.Generator().manual_seed(seed + 1)
    keep = []
    for cls, n in enumerate(target):
        idx = torch.nonzero(data.targets == cls).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    out = data.subset(torch.cat(keep).sort().values)
    out.info["longtail"] = {"imbalance": imbalance, "counts": target}
    return out


def limit_size(data: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    """A class-stratified subset of about ``n`` samples (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(data):
        return data
    if n <= 0:
        raise VitkitError(f"size limits must be positive, got {n}")
    frac = n / len(data)
    g = torch.Generator().manual_seed(seed + 2)
    labels = data.label_indices()
    keep = []
    for c in range(data.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[: max(1, math.floor(len(idx) * frac))]])
    return data.subset(torch.cat(keep).sort().values)


def load_splits(
    uri: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    longtail: float | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    img_size: int | None = None,
    strict: bool = False,
    train_samples: int | None = None,
) -> DataSplits:
    """Train and validation splits of a dataset URI.

    * If the source has an official test/val split (Fashion-MNIST, ``folder:`` with ``train/`` and
      ``val/``), validation is that split; otherwise ``val_fraction`` of every class is held out
      (deterministic for a given ``seed``).
    * ``longtail=ρ`` subsamples the training split only (validation stays balanced, as in DeiT-LT).
    * ``train_size`` / ``val_size`` take class-stratified subsets (for quick runs on large sets).
    * ``mosaic:URI`` splits URI first, then builds 2x2 multi-label mosaics of each split.
    * ``train_samples`` resamples the training split to exactly that many samples per epoch (a
      seeded shuffle, cycled when the split is smaller): DataComp's fixed number of samples seen
      whatever the (filtered) data's size; a streamed split simply reads that many per epoch.
    """
    splits = _load_splits(
        uri, val_fraction=val_fraction, seed=seed, longtail=longtail, train_size=train_size,
        val_size=val_size, img_size=img_size, strict=strict,
    )  # fmt: skip
    if train_samples is not None:
        splits = resample_train(splits, train_samples, seed)
    return splits


def resample_train(splits: DataSplits, samples: int, seed: int) -> DataSplits:
    """The training split shuffled (seeded) and cycled or cut to ``samples`` items; the data
    description records the original size and the resampling."""
    train = splits.train
    n = len(train)
    if n == 0:
        raise VitkitError(f"{train.name}: --train-samples {samples}: the training split is empty")
    if hasattr(train, "stream_batches"):  # a stream is endless: it reads `samples` per epoch
        train.epoch_samples = samples
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        train = train.subset(order[torch.arange(samples) % n])
    desc = {**splits.description, "train_size": samples, "train_unique": n, "train_samples": samples}
    return DataSplits(train, splits.val, splits.test, desc)


def _load_splits(
    uri: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    longtail: float | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    img_size: int | None = None,
    strict: bool = False,
) -> DataSplits:
    scheme, arg = parse_uri(uri)
    if scheme in ("imagetext", "shards"):  # image-caption pairs: no classes to stratify by
        from vitkit.data.imagetext import imagetext_splits

        if longtail is not None:
            raise VitkitError(f"{uri}: --longtail needs class labels; image-caption pairs have none")
        return imagetext_splits(
            scheme, arg, uri, val_fraction=val_fraction, seed=seed, train_size=train_size,
            val_size=val_size, img_size=img_size, strict=strict,
        )  # fmt: skip
    if scheme == "mosaic":
        inner = load_splits(
            arg,
            val_fraction=val_fraction,
            seed=seed,
            img_size=img_size,
            strict=strict,
            train_size=train_size,
            val_size=val_size,
        )
        return DataSplits(
            build_mosaic(inner.train, seed=seed),
            build_mosaic(inner.val, seed=seed + 1),
            None,
            {**inner.description, "uri": uri, "mosaic": True},
        )
    sources = load_source(uri, img_size=img_size, strict=strict)
    lopsided = ""
    if "train" in sources:
        train = sources["train"]
        check_classes(train, uri)
        val = sources.get("val") or sources.get("test")
        how = "official split"
    else:
        check_classes(sources["all"], uri)
        train, val = stratified_split(sources["all"], val_fraction, seed)
        how = f"stratified {val_fraction:.0%} hold-out, seed {seed}"
        if len(val) == 0:
            raise VitkitError(
                f"{uri}: val_fraction {val_fraction:g} leaves no validation images: no class has 2 or more images "
                f"({len(sources['all'])} images, {sources['all'].num_classes} classes); add images, or give a "
                "folder with train/ and val/"
            )
        # Judged before --train-size/--longtail shrink the training split on purpose.
        if len(train) < len(val):
            lopsided = (
                f", fewer than the {len(val)} held out by val_fraction {val_fraction:g} "
                "(a hold-out of 0.1-0.3 is usual)"
            )
    if longtail is not None:
        train = longtail_subset(train, longtail, seed)
    train = limit_size(train, train_size, seed)
    val = limit_size(val, val_size, seed)
    _warn_small_train(train, uri, lopsided)
    train.name = val.name = uri
    return DataSplits(
        train,
        val,
        None,
        {"uri": uri, "validation": how, "train_size": len(train), "val_size": len(val), "longtail": longtail},
    )


def check_classes(data: ImageDataset, uri: str) -> None:
    """A training set must give a classifier something to tell apart: ≥ 2 classes that have images.

    With one class the loss goes to 0 and top-1 to 1.0 without anything being learned.
    """
    if data.multilabel:
        t = data.targets
        varies = (t.amax(0) != t.amin(0)) if len(t) else torch.zeros(t.shape[1], dtype=torch.bool)
        if not bool(varies.any()):
            raise VitkitError(
                f"{uri}: no class is present in some images and absent in others ({len(t)} images, "
                f"{t.shape[1]} classes); multi-label training needs at least one class that varies"
            )
        return
    present = [c for c, n in zip(data.classes, data.class_counts()) if n > 0]
    if len(present) < 2:
        which = f"of one class ('{_show(present[0])}')" if present else "without a class"
        raise VitkitError(
            f"{uri}: all {len(data)} images are {which}; a classifier needs images of at least 2 classes"
        )


# A training split with fewer than 2 images per class leaves some class with a single example (with
# val_fraction 0.999 every class has exactly one): nothing to learn but that image. Scaled by the
# class count because a fixed count (say 50) would flag small deliberate experiments on 2-3 classes
# and miss a 1000-class set with 50 images.
_MIN_TRAIN_PER_CLASS = 2


def _warn_small_train(train: ImageDataset, uri: str, lopsided: str) -> None:
    # masks: every image holds many classes, so the count per class says nothing; two images do
    n, c = len(train), 1 if train.dense else train.num_classes
    if n == 0:
        raise VitkitError(f"{uri}: the training split has no images")
    if n < _MIN_TRAIN_PER_CLASS * c or lopsided:
        warnings.warn(
            f"{uri}: the training split has only {n} images for {c} classes{lopsided}",
            VitkitDataWarning,
            stacklevel=3,
        )


def load_eval_data(uri: str, img_size: int | None = None, strict: bool = False) -> ImageDataset:
    """All of a dataset for evaluation: its test/val split when it has one, else every image."""
    sources = load_source(uri, img_size=img_size, strict=strict)
    for key in ("test", "val", "all"):
        if key in sources:
            data = sources[key]
            data.name = uri
            return data
    return sources["train"]
