"""Dense-prediction datasets on disk: ``segfolder:PATH`` (images + index masks) and ``pairs:PATH``
(before/after image pairs + change masks, the LEVIR-CD layout).

``segfolder:PATH`` (the ADE20K / Cityscapes style):

    PATH/images/NAME.{png,jpg,...}   PATH/masks/NAME.png      (one set, split by --val-fraction)
    PATH/train/images, PATH/train/masks, PATH/val/...          (official splits)
    PATH/classes.txt                                           (optional: one class name per line)

A mask is a single-channel PNG of class indices (mode ``L``/``I``) or a palette PNG (mode ``P``,
whose pixel values are the indices; the palette is only how viewers colour them). Value 255 is
"ignore" (not scored, no loss). Without ``classes.txt`` the classes are ``0..max`` over all masks.

``pairs:PATH`` (LEVIR-CD, WHU-CD):

    PATH/A/NAME.png  PATH/B/NAME.png  PATH/label/NAME.png      (or PATH/train/A, ..., PATH/val/A, ...)

A change label is 0/255 (or 0/1): 255 (1) marks changed pixels. Both images of a pair are stacked
on the channel axis (``(N, 2C, H, W)``: A's channels, then B's), which every batch transform treats
as one image, so an augmentation moves both dates and the mask the same way.

Every problem is one line naming the file: a mask whose size differs from its image, a label outside
the classes, an image without its mask, a pair whose B image is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitkit.data.dataset import ImageDataset
from vitkit.data.sources import _DECODE_ERRORS, _list_images, _one_line, _read_image, _show, _stack
from vitkit.errors import VitkitError

IGNORE_INDEX = 255
CHANGE_CLASSES = ["unchanged", "changed"]
MASK_MODES = ("L", "P", "I", "I;16", "1")


def _split_dirs(root: Path, parts: tuple[str, ...]) -> dict[str, Path]:
    """``{"all": root}`` for a flat layout, else ``{"train": ..., "val": ..., "test": ...}``."""
    if all((root / p).is_dir() for p in parts):
        return {"all": root}
    splits = {s: root / s for s in ("train", "val", "test") if all((root / s / p).is_dir() for p in parts)}
    if "train" in splits and ("val" in splits or "test" in splits):
        return splits
    want = " + ".join(f"{p}/" for p in parts)
    raise VitkitError(f"'{root}': expected {want} (or train/ and val/ holding them)")


def read_mask(path: Path, img_size: int | None = None) -> np.ndarray:
    """A class-index mask (H, W) uint8; resized by nearest neighbour (never blends two labels)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in MASK_MODES:
                raise VitkitError(
                    f"mask '{_show(path)}' is a {im.mode} image; expected a single-channel index PNG "
                    "(mode L) or a palette PNG (mode P)"
                )
            arr = np.asarray(im)
            if img_size is not None and arr.shape != (img_size, img_size):
                im = Image.fromarray(arr.astype(np.int32)) if arr.dtype != np.uint8 else Image.fromarray(arr)
                arr = np.asarray(im.resize((img_size, img_size), Image.NEAREST))
    except _DECODE_ERRORS as e:
        raise VitkitError(f"cannot read mask '{_show(path)}': {_one_line(e)}") from e
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.size and int(arr.max()) > 255:
        raise VitkitError(
            f"mask '{_show(path)}' has value {int(arr.max())}; class indices must be 0-254 (255: ignore)"
        )
    return arr.astype(np.uint8)


def _pair_up(images: list[Path], folder: Path, what: str, image_dir: Path) -> list[Path]:
    """The file in ``folder`` with each image's stem (any image extension)."""
    by_stem: dict[str, Path] = {}
    for p in _list_images(folder):
        by_stem.setdefault(str(p.relative_to(folder).with_suffix("")), p)
    out = []
    for img in images:
        stem = str(img.relative_to(image_dir).with_suffix(""))
        if stem not in by_stem:
            raise VitkitError(
                f"'{_show(img)}' has no {what} in '{_show(folder)}' (expected {_show(stem)}.png)"
            )
        out.append(by_stem[stem])
    return out


def _read(path: Path, img_size: int | None) -> np.ndarray:
    try:
        return _read_image(path, img_size)
    except _DECODE_ERRORS as e:
        raise VitkitError(f"cannot read image '{_show(path)}': {_one_line(e)}") from e


def _check_size(image: np.ndarray, mask: np.ndarray, img_path: Path, mask_path: Path) -> None:
    if tuple(image.shape[1:]) != tuple(mask.shape):
        h, w = image.shape[1:]
        mh, mw = mask.shape
        raise VitkitError(
            f"mask '{_show(mask_path)}' is {mw}x{mh} but its image '{_show(img_path.name)}' is {w}x{h}; "
            "a mask must have its image's size"
        )


def _read_classes(root: Path) -> list[str] | None:
    p = root / "classes.txt"
    if not p.is_file():
        return None
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < 2:
        raise VitkitError(f"'{p}': list at least 2 class names, one per line")
    if len(names) > 255:
        raise VitkitError(f"'{p}': {len(names)} classes; index masks hold at most 255 (255 is ignore)")
    return names


def _load_segmentation_set(
    folder: Path, img_size: int | None, source: str
) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    img_dir, mask_dir = folder / "images", folder / "masks"
    paths = _list_images(img_dir)
    if not paths:
        raise VitkitError(f"{source}: no images in '{_show(img_dir)}'")
    mask_paths = _pair_up(paths, mask_dir, "mask", img_dir)
    from vitkit.progress import track

    images, masks = [], []
    for ip, mp in track(list(zip(paths, mask_paths)), description=f"reading {source}"):
        img, mask = _read(ip, img_size), read_mask(mp, img_size)
        _check_size(img, mask, ip, mp)
        images.append(img)
        masks.append(mask)
    return _stack(images, source), torch.from_numpy(np.stack(masks)).long(), mask_paths


def load_segfolder(path: str, img_size: int | None = None) -> dict[str, ImageDataset]:
    """``segfolder:PATH``: see the module docstring."""
    root = Path(path)
    if not root.is_dir():
        raise VitkitError(f"segmentation folder '{path}' does not exist")
    source = f"segfolder:{path}"
    loaded = {
        s: _load_segmentation_set(d, img_size, source)
        for s, d in _split_dirs(root, ("images", "masks")).items()
    }
    classes = _read_classes(root)
    if classes is None:
        top = max(
            int(m[m != IGNORE_INDEX].max()) if bool((m != IGNORE_INDEX).any()) else 0
            for _, m, _ in loaded.values()
        )
        classes = [str(i) for i in range(max(top + 1, 2))]
    out = {}
    for split, (images, masks, mask_paths) in loaded.items():
        bad = (masks >= len(classes)) & (masks != IGNORE_INDEX)
        if bool(bad.any()):
            i = int(bad.flatten(1).any(1).nonzero()[0])
            raise VitkitError(
                f"mask '{_show(mask_paths[i])}' has label {int(masks[i][bad[i]].max())}, outside the "
                f"{len(classes)} classes of {root / 'classes.txt'} (0-{len(classes) - 1}; 255: ignore)"
            )
        out[split] = ImageDataset(images, masks, list(classes), source, {"ignore_index": IGNORE_INDEX})
    return out


def _load_pair_set(folder: Path, img_size: int | None, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    a_dir, b_dir, label_dir = folder / "A", folder / "B", folder / "label"
    a_paths = _list_images(a_dir)
    if not a_paths:
        raise VitkitError(f"{source}: no images in '{_show(a_dir)}'")
    b_paths = _pair_up(a_paths, b_dir, "B image", a_dir)
    label_paths = _pair_up(a_paths, label_dir, "change label", a_dir)
    from vitkit.progress import track

    pairs, labels = [], []
    for ap, bp, lp in track(list(zip(a_paths, b_paths, label_paths)), description=f"reading {source}"):
        a, b, lab = _read(ap, img_size), _read(bp, img_size), read_mask(lp, img_size)
        if a.shape[1:] != b.shape[1:]:
            raise VitkitError(
                f"'{_show(bp)}' is {b.shape[2]}x{b.shape[1]} but its A image is {a.shape[2]}x{a.shape[1]}; "
                "both dates of a pair must have the same size"
            )
        _check_size(a, lab, ap, lp)
        values = set(np.unique(lab).tolist())
        if not values <= {0, 1, 255}:
            raise VitkitError(
                f"change label '{_show(lp)}' has values {sorted(values)[:5]}; expected 0 (unchanged) and 255 or 1 (changed)"
            )
        if a.shape[0] != b.shape[0]:  # one gray, one colour: both colour
            a, b = (np.repeat(v, 3, 0) if v.shape[0] == 1 else v for v in (a, b))
        pairs.append(np.concatenate([a, b]))
        labels.append((lab > 0).astype(np.uint8))
    channels = {p.shape[0] for p in pairs}
    if len(channels) > 1:
        pairs = [
            np.concatenate([np.repeat(p[:1], 3, 0), np.repeat(p[1:], 3, 0)]) if p.shape[0] == 2 else p
            for p in pairs
        ]
    return _stack(pairs, source), torch.from_numpy(np.stack(labels)).long()


def load_pairs(path: str, img_size: int | None = None) -> dict[str, ImageDataset]:
    """``pairs:PATH``: see the module docstring."""
    root = Path(path)
    if not root.is_dir():
        raise VitkitError(f"image-pair folder '{path}' does not exist")
    source = f"pairs:{path}"
    out = {}
    for split, d in _split_dirs(root, ("A", "B", "label")).items():
        images, labels = _load_pair_set(d, img_size, source)
        out[split] = ImageDataset(images, labels, list(CHANGE_CLASSES), source, {"pair": True})
    return out
