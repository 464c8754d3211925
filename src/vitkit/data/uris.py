"""Dataset sources named by URI. Each returns its official splits as in-memory datasets.

| URI              | what                                                                            |
|------------------|---------------------------------------------------------------------------------|
| ``digits``       | scikit-learn's bundled UCI handwritten digits: 1,797 real 8x8 images, 10 classes |
| ``fashion-mnist``| 60k + 10k real 28x28 images from Debian's ``dataset-fashion-mnist`` package      |
| ``folder:PATH``  | an ImageFolder tree (``PATH/<class>/<image>``; or ``PATH/train`` + ``PATH/val``) |
| ``csv:PATH``     | image path + label(s) per row; several labels make the set multi-label          |
| ``npz:PATH``     | arrays ``x`` (images) and ``y`` (labels or multi-hot), optional ``classes``       |
| ``mosaic:URI``   | 2x2 mosaics of URI's images with multi-hot targets (a multi-label builder)       |
| ``canvas[:k=v]`` | generated canvases of pasted digits with exact semantic masks (data/canvas.py)    |
| ``canvas-change``| generated before/after canvas pairs with change masks (``canvas-change:k=v``)     |
| ``canvas-boxes`` | the canvases with the items' boxes, for detection (``canvas-boxes:k=v``)          |
| ``coco:PATH``    | a COCO annotation file (or a folder with train.json + val.json) and its images    |
| ``segfolder:PATH``| images/ + masks/ (index or palette PNGs) for segmentation (data/dense.py)        |
| ``pairs:PATH``   | A/ + B/ + label/ image pairs for change detection, the LEVIR-CD layout            |
| ``imagetext:PATH``| a CSV of image paths and captions (image-text; data/imagetext.py)               |
| ``shards:PATTERN``| webdataset tar shards of images + captions, streamed (``{00000..00031}.tar``)   |
"""

from __future__ import annotations

import os

from vitkit.data.canvas import load_canvas
from vitkit.data.dataset import ImageDataset
from vitkit.data.dense import load_pairs, load_segfolder
from vitkit.data.sources import load_csv, load_digits, load_fashion_mnist, load_folder, load_npz
from vitkit.errors import VitkitError

SCHEMES = (
    "digits",
    "fashion-mnist",
    "folder:PATH",
    "csv:PATH",
    "npz:PATH",
    "mosaic:URI",
    "canvas",
    "canvas-change",
    "canvas-boxes",
    "segfolder:PATH",
    "pairs:PATH",
    "coco:PATH",
    "imagetext:PATH",
    "shards:PATTERN",
)
_PATH_SCHEMES = ("folder", "csv", "npz", "mosaic", "segfolder", "pairs", "coco", "imagetext", "shards")
_GENERATED = ("canvas", "canvas-change", "canvas-boxes")  # options optional: canvas, canvas:size=32


def parse_uri(uri: str) -> tuple[str, str]:
    """Split ``scheme:arg``; plain names (``digits``) have an empty argument."""
    if uri in ("digits", "fashion-mnist", *_GENERATED):
        return uri, ""
    scheme, sep, arg = uri.partition(":")
    if sep and scheme in _PATH_SCHEMES and arg:
        return scheme, arg
    if sep and scheme in _GENERATED:
        return scheme, arg
    hint = ""
    if os.path.isdir(uri):
        hint = f" (for an image folder write folder:{uri})"
    elif uri.endswith(".csv") or uri.endswith(".npz"):
        hint = f" (write {uri.rsplit('.', 1)[1]}:{uri})"
    raise VitkitError(f"unknown dataset '{uri}': expected one of {', '.join(SCHEMES)}{hint}")


def load_source(uri: str, img_size: int | None = None, strict: bool = False) -> dict[str, ImageDataset]:
    """Load the official splits of a dataset URI: ``{"all": ...}`` or ``{"train": ..., "test": ...}``.

    ``img_size`` resizes files read from disk (folder, csv) at load time; array sources keep their
    native resolution and are resized per batch.
    """
    scheme, arg = parse_uri(uri)
    if scheme == "digits":
        return {"all": load_digits()}
    if scheme == "fashion-mnist":
        return load_fashion_mnist()
    if scheme == "folder":
        return load_folder(arg, img_size=img_size, strict=strict)
    if scheme == "csv":
        return {"all": load_csv(arg, img_size=img_size, strict=strict)}
    if scheme == "npz":
        return {"all": load_npz(arg)}
    if scheme in _GENERATED:
        return load_canvas(arg, uri, change=scheme == "canvas-change", boxes=scheme == "canvas-boxes")
    if scheme == "coco":
        from vitkit.data.boxes import load_coco

        return load_coco(arg, img_size)
    if scheme == "segfolder":
        return load_segfolder(arg, img_size=img_size)
    if scheme == "pairs":
        return load_pairs(arg, img_size=img_size)
    if scheme == "imagetext":
        from vitkit.data.imagetext import load_imagetext_csv

        return {"all": load_imagetext_csv(arg, img_size=img_size, strict=strict)}
    if scheme == "shards":
        raise VitkitError(
            f"'{uri}': shards are streamed for training; to evaluate on pairs give imagetext:CSV "
            "(a run trained on shards validates on its last shard)"
        )
    raise VitkitError(f"'{uri}': mosaic datasets are built by vitkit.data.load_splits, not loaded directly")
