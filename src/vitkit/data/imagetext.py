"""Image-text pairs: ``imagetext:CSV`` (in memory) and ``shards:PATTERN`` (webdataset tar shards,
streamed).

- ``imagetext:pairs.csv``: a UTF-8 CSV with an image path column (``path``/``image``/``filename``/
  ``file``, relative to the CSV) and a caption column (``caption``/``text``/``title``). Rows without a
  caption and images that fail to decode are skipped with one warning each that counts them. The
  pairs live in an :class:`ImageDataset` whose targets are caption ids into ``info["captions"]``
  (so subsets and splits keep working); validation is a random ``val_fraction`` hold-out.
- ``shards:/data/{00000..00031}.tar``: webdataset's layout (files ``KEY.png|jpg|jpeg|webp`` and
  ``KEY.txt`` next to each other in each tar), brace patterns expanded as webdataset expands them.
  The **last** shard is the validation split (read into memory); the others are streamed
  (:class:`ShardStream`): a pool larger than memory trains without being loaded whole. The stream is
  deterministic per epoch (shard order and a shuffle buffer seeded by seed and epoch), so a run
  resumed mid-epoch skips exactly the samples it had consumed. A shard that ends mid-file is read
  up to its last whole sample and the rest skipped, with a warning that counts what was read; an
  image that fails to decode is skipped and counted. Sample counts come from one scan of the tar
  headers at load time (no image is decoded then).

Tar members are read with webdataset's own iterators (``tar_file_iterator``, ``group_by_keys``).
"""

from __future__ import annotations

import io
import os
import random
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitkit.data.dataset import DataSplits, ImageDataset
from vitkit.data.sources import (
    _DECODE_ERRORS,
    _PATH_COLUMNS,
    VitkitDataWarning,
    _one_line,
    _read_csv_rows,
    _show,
    read_listed_images,
)
from vitkit.errors import VitkitError

CAPTION_COLUMNS = ("caption", "text", "title")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
SHUFFLE_BUFFER = 1000


def readable_class_name(name: str) -> str:
    """What a prompt says for a class: ``T-shirt/top`` -> ``t-shirt or top``, ``7`` -> ``digit 7``."""
    name = name.strip()
    if name.isdigit():
        return f"digit {name}"
    return name.replace("_", " ").replace("/", " or ").lower()


def is_imagetext(data: ImageDataset | ShardStream) -> bool:
    return isinstance(data, ShardStream) or bool(getattr(data, "info", {}).get("captions") is not None)


def captions_of(data: ImageDataset) -> list[str]:
    """The caption of every sample of an in-memory image-text dataset, in order."""
    table = data.info["captions"]
    return [table[int(i)] for i in data.targets]


def pairs_dataset(
    images: torch.Tensor, captions: list[str], name: str, info: dict | None = None
) -> ImageDataset:
    """An in-memory image-text dataset: targets are caption ids into ``info["captions"]``."""
    return ImageDataset(
        images,
        torch.arange(len(captions), dtype=torch.long),
        [],
        name,
        {**(info or {}), "captions": list(captions)},
    )


# -- imagetext:CSV ----------------------------------------------------------------------------------
def load_imagetext_csv(path: str, img_size: int | None = None, strict: bool = False) -> ImageDataset:
    file = Path(path)
    source = f"imagetext:{path}"
    if not file.is_file():
        raise VitkitError(f"{source}: file does not exist (expected a CSV of image paths and captions)")
    columns, numbered = _read_csv_rows(file, source)
    if not numbered:
        raise VitkitError(f"{source}: no rows (expected a header line and one row per image-caption pair)")
    lower = {c.lower().strip(): c for c in columns}
    path_col = next((lower[c] for c in _PATH_COLUMNS if c in lower), None)
    text_col = next((lower[c] for c in CAPTION_COLUMNS if c in lower), None)
    if path_col is None or text_col is None:
        want = "image path" if path_col is None else "caption"
        names = _PATH_COLUMNS if path_col is None else CAPTION_COLUMNS
        raise VitkitError(f"{source}: no {want} column (expected one of {', '.join(names)}; found {columns})")
    base = file.parent
    paths, captions, no_caption = [], [], []
    for n, r in numbered:
        if None in r:
            raise VitkitError(
                f"{source} line {n}: {len(columns) + len(r[None])} fields but the header names {len(columns)}"
            )
        name = (r.get(path_col) or "").strip()
        if not name:
            raise VitkitError(f"{source} line {n}: empty '{_show(path_col)}' (expected an image path)")
        caption = " ".join((r.get(text_col) or "").split())
        if not caption:
            no_caption.append(n)
            continue
        paths.append(Path(name) if os.path.isabs(name) else base / name)
        captions.append(caption)
    if no_caption:
        if strict:
            raise VitkitError(
                f"{source} line {no_caption[0]}: empty '{_show(text_col)}' (expected a caption)"
            )
        warnings.warn(
            f"{source}: skipped {len(no_caption)} row(s) without a caption (first: line {no_caption[0]})",
            VitkitDataWarning,
            stacklevel=2,
        )
    if not paths:
        raise VitkitError(f"{source}: no row has a caption")
    images, keep = read_listed_images(paths, img_size, strict, source, base)
    return pairs_dataset(
        images,
        [captions[i] for i in keep],
        source,
        {
            "files": [str(paths[i]) for i in keep],
            "skipped_no_caption": len(no_caption),
            "skipped_unreadable": len(paths) - len(keep),
        },
    )


def split_pairs(
    data: ImageDataset, val_fraction: float, seed: int, train_size: int | None, val_size: int | None
) -> tuple[ImageDataset, ImageDataset]:
    n = len(data)
    n_val = round(n * val_fraction)
    if n_val < 1 or n - n_val < 2:
        raise VitkitError(
            f"{data.name}: {n} pairs cannot give a validation split of {val_fraction:g} and a training split"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train, val = data.subset(order[n_val:]), data.subset(order[:n_val])
    if train_size is not None and train_size < len(train):
        train = train.subset(torch.arange(train_size))
    if val_size is not None and val_size < len(val):
        val = val.subset(torch.arange(val_size))
    return train, val


# -- shards: ----------------------------------------------------------------------------------------
def expand_shards(pattern: str) -> list[str]:
    """``/data/{00000..00031}.tar`` -> the shard paths (webdataset's brace expansion; ``::`` joins
    several patterns)."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(pattern)
    if not urls:
        raise VitkitError(f"shards:{pattern}: the pattern names no file")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise VitkitError(
            f"shards:{pattern}: shard '{_show(missing[0])}' does not exist ({len(missing)} missing)"
        )
    return urls


@dataclass
class _ShardReport:
    samples: int = 0
    truncated: str | None = None  # why the shard stopped early, or None


def _iter_shard(url: str) -> Iterator[tuple[str, bytes, str]]:
    """``(key, image bytes, caption)`` of each whole sample in the shard (webdataset's iterators);
    raises ``tarfile.ReadError``/``EOFError``/``OSError`` where the tar is cut or corrupt."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(url, "rb") as f:
        files = ({**member, "__url__": url} for member in tar_file_iterator(f))
        for sample in group_by_keys(files):
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if image_ext is None or "txt" not in sample:
                continue  # not an image-caption sample (metadata, a lone file)
            caption = " ".join(sample["txt"].decode("utf-8", "replace").split())
            if caption:
                yield sample["__key__"], sample[image_ext], caption


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


def scan_shard(url: str) -> _ShardReport:
    """Count a shard's whole samples (headers and captions only; images are not decoded)."""
    report = _ShardReport()
    try:
        for _ in _iter_shard(url):
            report.samples += 1
    except _TAR_ERRORS as e:
        report.truncated = _one_line(e)
    return report


def decode_image(data: bytes, img_size: int, channels: int) -> np.ndarray:
    """(C, H, W) uint8 at ``img_size``, grey or RGB as ``channels`` says."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (img_size, img_size):
            im = im.resize((img_size, img_size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@dataclass
class ShardStream:
    """The training split of ``shards:``: samples streamed from tar shards, never all in memory.

    ``len()`` is the number of whole samples the scan found; :meth:`stream_batches` is what the
    training loop reads instead of indexing images. ``skipped`` counts images that failed to decode
    while streaming (reported once per kind in a warning)."""

    urls: list[str]
    counts: list[int]
    img_size: int
    channels: int
    name: str
    buffer: int = SHUFFLE_BUFFER
    info: dict = field(default_factory=dict)
    skipped: int = 0
    classes: list[str] = field(default_factory=list)
    epoch_samples: int | None = None  # --train-samples: the samples an epoch reads (the stream cycles)

    def __len__(self) -> int:
        return self.epoch_samples or sum(self.counts)

    @property
    def num_classes(self) -> int:
        return 0

    multilabel = False
    dense = False
    boxes = False
    pair = False

    def class_counts(self) -> list[int]:
        return []

    def label_indices(self) -> torch.Tensor:
        raise VitkitError(f"{self.name}: streamed image-text pairs have no labels to sample by")

    def samples(self, seed: int) -> Iterator[tuple[np.ndarray, str]]:
        """The endless, deterministic stream of decoded ``(image, caption)`` for one seed: the shards
        in a seeded order through a seeded shuffle buffer, pass after pass (a pass that comes up short
        because an image failed to decode is topped up from the next pass)."""
        rng = random.Random(seed)
        warned = False
        while True:
            order = list(range(len(self.urls)))
            rng.shuffle(order)
            buf: list[tuple[bytes, str]] = []
            for i in order:
                try:
                    for _, image, caption in _iter_shard(self.urls[i]):
                        buf.append((image, caption))
                        if len(buf) >= self.buffer:
                            out = self._decode(buf.pop(rng.randrange(len(buf))), warned)
                            if out is None:
                                warned = True
                            else:
                                yield out
                except _TAR_ERRORS:
                    pass  # the load-time scan warned about this shard and counted what it holds
            while buf:
                out = self._decode(buf.pop(rng.randrange(len(buf))), warned)
                if out is None:
                    warned = True
                else:
                    yield out

    def _decode(self, item: tuple[bytes, str], warned: bool) -> tuple[np.ndarray, str] | None:
        image, caption = item
        try:
            return decode_image(image, self.img_size, self.channels), caption
        except (*_DECODE_ERRORS, Image.DecompressionBombError) as e:
            self.skipped += 1
            if not warned:
                warnings.warn(
                    f"{self.name}: skipped an image that does not decode ({_one_line(e)}); further ones are "
                    "counted in the run's data description",
                    VitkitDataWarning,
                    stacklevel=2,
                )
            return None

    def stream_batches(
        self, seed: int, batch: int, start: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Batches of ``(uint8 images (B, C, H, W), captions)`` for this process, from step ``start``
        on: sample ``i`` of the seeded stream goes to process ``i % world_size``; the samples of the
        ``start`` steps already taken are read and dropped (that is what makes a resume exact)."""
        it = self.samples(seed)
        skip = start * batch * world_size
        for _ in range(skip):
            next(it)
        while True:
            images, captions = [], []
            for _ in range(batch * world_size):
                img, cap = next(it)
                images.append(img)
                captions.append(cap)
            mine = slice(rank, None, world_size)
            yield torch.from_numpy(np.stack(images[mine])), captions[mine]


def load_shards(
    pattern: str, img_size: int | None, strict: bool = False, val_size: int | None = None
) -> tuple[ShardStream, ImageDataset]:
    """The training stream over every shard but the last, and the last shard in memory (validation)."""
    source = f"shards:{pattern}"
    urls = expand_shards(pattern)
    if len(urls) < 2:
        raise VitkitError(
            f"{source}: {len(urls)} shard; give 2 or more (the last one is held out for validation)"
        )
    reports = [scan_shard(u) for u in urls]
    bad = [(u, r) for u, r in zip(urls, reports) if r.truncated]
    for u, r in bad:
        if strict:
            raise VitkitError(f"{source}: shard '{_show(u)}' is truncated or corrupt: {r.truncated}")
        warnings.warn(
            f"{source}: shard '{_show(u)}' is truncated or corrupt ({r.truncated}); read its first "
            f"{r.samples} whole sample(s), skipped the rest",
            VitkitDataWarning,
            stacklevel=2,
        )
    if reports[-1].samples == 0:
        raise VitkitError(f"{source}: the validation shard '{_show(urls[-1])}' holds no image-caption sample")
    if sum(r.samples for r in reports[:-1]) == 0:
        raise VitkitError(f"{source}: the training shards hold no image-caption sample")

    # validation: the last shard, decoded into memory
    images, captions, undecodable = [], [], 0
    size = img_size
    channels = None
    try:
        for _, data, caption in _iter_shard(urls[-1]):
            try:
                with Image.open(io.BytesIO(data)) as im:
                    gray = im.mode in ("L", "1", "I", "I;16", "F", "LA")
                    size = size or max(im.size)
                channels = channels or (1 if gray else 3)
                images.append(decode_image(data, size, channels))
                captions.append(caption)
            except (*_DECODE_ERRORS, Image.DecompressionBombError):
                undecodable += 1
            if val_size is not None and len(images) >= val_size:
                break
    except _TAR_ERRORS:
        pass  # warned above
    if not images:
        raise VitkitError(f"{source}: no image of the validation shard '{_show(urls[-1])}' decodes")
    if undecodable:
        warnings.warn(
            f"{source}: skipped {undecodable} validation image(s) that do not decode",
            VitkitDataWarning,
            stacklevel=2,
        )
    info = {"truncated_shards": len(bad), "validation_undecodable": undecodable}
    val = pairs_dataset(torch.from_numpy(np.stack(images)), captions, source, info)
    train = ShardStream(
        urls[:-1], [r.samples for r in reports[:-1]], int(size), int(channels), source, info=dict(info)
    )
    return train, val


def imagetext_splits(
    scheme: str,
    arg: str,
    uri: str,
    *,
    val_fraction: float,
    seed: int,
    train_size: int | None,
    val_size: int | None,
    img_size: int | None,
    strict: bool,
) -> DataSplits:
    if scheme == "shards":
        train, val = load_shards(arg, img_size, strict, val_size)
        how = "the last shard"
    else:
        pairs = load_imagetext_csv(arg, img_size, strict)
        train, val = split_pairs(pairs, val_fraction, seed, train_size, val_size)
        how = f"random {val_fraction:.0%} hold-out, seed {seed}"
    val.name = uri
    train.name = uri
    return DataSplits(
        train,  # type: ignore[arg-type]  # a ShardStream stands in for the training ImageDataset
        val,
        None,
        {
            "uri": uri,
            "validation": how,
            "train_size": len(train),
            "val_size": len(val),
            "longtail": None,
            **({"streamed": True, "shards": len(train.urls)} if scheme == "shards" else {}),
        },
    )
