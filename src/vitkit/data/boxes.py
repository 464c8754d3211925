"""Box targets for detection: their layout, the ``coco:PATH`` dataset and the joint image/box transform.

Layout: ``ImageDataset.targets`` is (N, M, 5) float32, one row per box ``[label, x0, y0, x1, y1]`` in
pixels of the stored image (x1, y1 are exclusive edges: COCO's ``x + w``), padded with rows whose
label is -1; ``info["boxes"]`` marks such a dataset. A padded tensor batches, indexes and splits like
every other target, and :func:`unpack_boxes` turns a batch into the per-image ``{"boxes", "labels"}``
dicts torchvision's detectors and torchmetrics take.

``coco:PATH`` (the format every detection user has):

    PATH = ann.json                      one set (split by --val-fraction); images next to it or in images/
    PATH = DIR with train.json, val.json official splits (images in DIR or DIR/images)

Images are read as ``file_name`` relative to the JSON's folder (or its ``images/``), resized to the
model's input size (boxes scaled with them; a non-square image is stretched). When every image has a
``group`` (or ``patient_id``) field, it becomes ``info["groups"]`` (a patient per image), which
``vitkit crop`` passes on to group-level evaluation. Categories keep their
id order. One line naming the file for: an unreadable or empty annotation file, an image missing
from disk, an annotation naming an unknown image or category, a box outside its image or with no
area.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from vitkit.data.dataset import ImageDataset
from vitkit.data.sources import _DECODE_ERRORS, _read_image, _stack
from vitkit.data.transforms import AugmentConfig, BatchTransform, _adapt_channels, _resize, random_scale_crop
from vitkit.errors import VitkitError

PAD_LABEL = -1
BOX_TOLERANCE = 1.0  # pixels a COCO box may pass the image edge by (rounding in exported annotations)
MIN_VISIBLE = 0.25  # a cropped box keeps at least this fraction of its area, else it is dropped
GROUP_KEYS = ("group", "patient_id")  # an image field naming its group, read when every image has it


def pack_boxes(boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """Per-image (k, 4) xyxy boxes and (k,) labels -> (N, M, 5) padded targets (M >= 1)."""
    m = max([len(b) for b in boxes] + [1])
    out = torch.full((len(boxes), m, 5), float(PAD_LABEL))
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        out[i, : len(b), 0] = lab.float()
        out[i, : len(b), 1:] = b.float()
    return out


def unpack_boxes(targets: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """(B, M, 5) padded targets -> per image ``{"boxes": (k, 4) float, "labels": (k,) int64}``."""
    out = []
    for t in targets:
        keep = t[:, 0] >= 0
        out.append({"boxes": t[keep, 1:].float(), "labels": t[keep, 0].long()})
    return out


def box_counts(targets: torch.Tensor, num_classes: int) -> list[int]:
    labels = targets[..., 0].flatten()
    labels = labels[labels >= 0].long()
    return [int(c) for c in torch.bincount(labels, minlength=num_classes).tolist()]


# -- coco:PATH ------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitkitError(f"{path}: not a readable COCO annotation file ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise VitkitError(f"{path}: not a COCO annotation file (no 'images' list)")
    if not doc["images"]:
        raise VitkitError(f"{path}: the annotation file lists no images")
    if not isinstance(doc.get("categories"), list) or not doc["categories"]:
        raise VitkitError(f"{path}: the annotation file lists no categories")
    return doc


def _categories(doc: dict, path: Path) -> tuple[list[int], list[str]]:
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in doc["categories"])
    except (KeyError, TypeError, ValueError) as e:
        raise VitkitError(f"{path}: every category needs an integer 'id' and a 'name' ({e})") from e
    return [c[0] for c in cats], [c[1] for c in cats]


def _image_path(root: Path, name: str, path: Path) -> Path:
    for base in (root, root / "images"):
        p = base / name
        if p.is_file():
            return p
    raise VitkitError(f"{path}: image '{name}' is missing from disk (looked in {root} and {root / 'images'})")


def load_coco_file(path: Path, img_size: int, cat_ids: list[int] | None = None, names=None) -> ImageDataset:
    """One COCO annotation file as a box dataset at ``img_size`` x ``img_size``."""
    doc = _read_json(path)
    ids, cat_names = _categories(doc, path)
    if cat_ids is not None and ids != cat_ids:
        raise VitkitError(f"{path}: its categories differ from the training file's ({names})")
    index = {cid: i for i, cid in enumerate(ids)}
    images, by_image = [], {}
    for im in doc["images"]:
        try:
            by_image[int(im["id"])] = (str(im["file_name"]), len(by_image))
        except (KeyError, TypeError, ValueError) as e:
            raise VitkitError(f"{path}: every image needs an integer 'id' and a 'file_name' ({e})") from e
    boxes: list[list[list[float]]] = [[] for _ in by_image]
    labels: list[list[int]] = [[] for _ in by_image]
    sizes: list[tuple[int, int]] = []
    root = path.parent
    for name, _ in by_image.values():
        p = _image_path(root, name, path)
        try:
            with Image.open(p) as im:
                ww, hh = im.size
            images.append(_read_image(p, img_size))
        except _DECODE_ERRORS as e:
            raise VitkitError(f"{p}: not a readable image ({type(e).__name__})") from e
        sizes.append((hh, ww))
    for a in doc.get("annotations", []):
        try:
            img_id, cat, (x, y, w, h) = int(a["image_id"]), int(a["category_id"]), map(float, a["bbox"])
        except (KeyError, TypeError, ValueError) as e:
            raise VitkitError(
                f"{path}: annotation {a.get('id', '?')} needs image_id, category_id and bbox [x, y, w, h] ({e})"
            ) from e
        if img_id not in by_image:
            raise VitkitError(
                f"{path}: annotation {a.get('id', '?')} names image id {img_id}, which is not listed"
            )
        if cat not in index:
            raise VitkitError(
                f"{path}: annotation {a.get('id', '?')} has category_id {cat}, not one of the categories {ids}"
            )
        name, i = by_image[img_id]
        hh, ww = sizes[i]
        t = BOX_TOLERANCE
        if w <= 0 or h <= 0 or x < -t or y < -t or x + w > ww + t or y + h > hh + t:
            raise VitkitError(
                f"{path}: annotation {a.get('id', '?')} of '{name}': box [x={x}, y={y}, w={w}, h={h}] is outside "
                f"the {ww}x{hh} image or has no area"
            )
        sx, sy = img_size / ww, img_size / hh
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(ww)), min(y + h, float(hh))
        boxes[i].append([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
        labels[i].append(index[cat])
    targets = pack_boxes(
        [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
        [torch.tensor(lab, dtype=torch.long) for lab in labels],
    )
    info: dict = {"boxes": True}
    group_key = next((k for k in GROUP_KEYS if all(k in im for im in doc["images"])), None)
    if group_key is not None:  # a patient (or any group) per image: group-level evaluation of crops
        names: dict[str, int] = {}
        order = sorted(by_image.items(), key=lambda kv: kv[1][1])
        per_image = {int(im["id"]): str(im[group_key]) for im in doc["images"]}
        info["groups"] = torch.tensor([names.setdefault(per_image[i], len(names)) for i, _ in order])
        info["group_key"] = group_key
    return ImageDataset(_stack(images, f"coco:{path}"), targets, cat_names, f"coco:{path}", info)


def load_coco(arg: str, img_size: int | None) -> dict[str, ImageDataset]:
    """``coco:PATH``: one annotation file (``{"all": ...}``) or a folder with train.json + val.json."""
    if not img_size:
        raise VitkitError(f"coco:{arg}: give the input size (--img-size) to resize the images to")
    p = Path(arg)
    if p.is_dir():
        train, val = p / "train.json", p / "val.json"
        if not (train.is_file() and val.is_file()):
            raise VitkitError(f"coco:{arg}: a folder needs train.json and val.json (or name one .json file)")
        tr = load_coco_file(train, img_size)
        ids, _ = _categories(_read_json(train), train)
        return {"train": tr, "val": load_coco_file(val, img_size, ids, tr.classes)}
    if not p.is_file():
        raise VitkitError(f"coco:{arg}: no such annotation file or folder")
    return {"all": load_coco_file(p, img_size)}


# -- the joint transform -----------------------------------------------------------------------------------
class BoxBatchTransform:
    """Images and their boxes together: uint8 (B, C, H, W) + (B, M, 5) → normalized float images at
    ``img_size`` and the boxes in its pixels. Training draws a scale-crop (area fraction in
    ``scale``, anywhere inside the image), a shift (``translate``) and a horizontal flip per sample,
    as :class:`~vitkit.data.DenseBatchTransform` does for masks; a box is clipped to the crop and
    dropped when less than a quarter of it stays visible."""

    def __init__(
        self,
        img_size: int | tuple[int, int],
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool = False,
        augment: AugmentConfig | None = None,
    ):
        self.size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        one = BatchTransform(img_size, in_chans, mean, std)
        self.mean, self.std = one.mean, one.std
        self.train = train
        self.aug = augment or AugmentConfig()

    def set_mixup_enabled(self, enabled: bool) -> None:  # the loop's interface; boxes are never mixed
        pass

    def images(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _adapt_channels(x.float().div_(255.0), self.in_chans)
        if tuple(x.shape[-2:]) != self.size:
            x = _resize(x, self.size)
        return (x - self.mean) / self.std

    def scale_boxes(self, targets: torch.Tensor, src: tuple[int, int]) -> torch.Tensor:
        """Boxes of images of size ``src`` (h, w) in this transform's output pixels."""
        out = targets.clone()
        sy, sx = self.size[0] / src[0], self.size[1] / src[1]
        keep = out[..., 0] >= 0
        out[..., 1::2] = torch.where(keep[..., None], out[..., 1::2] * sx, out[..., 1::2])
        out[..., 2::2] = torch.where(keep[..., None], out[..., 2::2] * sy, out[..., 2::2])
        return out

    def __call__(
        self, x: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src = (x.shape[-2], x.shape[-1])
        if not self.train:
            return self.images(x), self.scale_boxes(targets, src)
        x, _, (s, tx, ty, flip) = random_scale_crop(
            _adapt_channels(x.float().div_(255.0), self.in_chans), self.size, self.aug, generator
        )
        return (x - self.mean) / self.std, self._move_boxes(targets, src, s, tx, ty, flip)

    def _move_boxes(self, targets, src, s, tx, ty, flip) -> torch.Tensor:
        """The inverse of the sampling grid on box corners: input u_in = s * u_out + t (x mirrored
        when flipped), in [-1, 1] coordinates whose ends are the image's outer pixel edges."""
        h, w = src
        out = torch.full_like(targets, float(PAD_LABEL))
        for i, t in enumerate(targets):
            keep = t[:, 0] >= 0
            lab, bx = t[keep, 0], t[keep, 1:]
            ux = (2 * bx[:, 0::2] / w - 1 - tx[i]) / s[i]
            uy = (2 * bx[:, 1::2] / h - 1 - ty[i]) / s[i]
            if flip[i]:
                ux = -ux.flip(1)
            area = (ux[:, 1] - ux[:, 0]) * (uy[:, 1] - uy[:, 0])
            ux, uy = ux.clamp(-1, 1), uy.clamp(-1, 1)
            visible = (ux[:, 1] - ux[:, 0]) * (uy[:, 1] - uy[:, 0])
            ok = (visible >= MIN_VISIBLE * area) & (visible > 0)
            px = (ux[ok] + 1) / 2 * self.size[1]
            py = (uy[ok] + 1) / 2 * self.size[0]
            n = int(ok.sum())
            out[i, :n, 0] = lab[ok]
            out[i, :n, 1], out[i, :n, 3] = px[:, 0], px[:, 1]
            out[i, :n, 2], out[i, :n, 4] = py[:, 0], py[:, 1]
        return out
