"""``canvas``: embedded dense-prediction data, generated from real item images, no download.

Each canvas is a ``size`` x ``size`` grayscale image with 1-5 items (scikit-learn's digits or
Fashion-MNIST images) pasted at random positions and scales over a noisy background; later items
occlude earlier ones. Every canvas comes with exact labels:

- the **semantic mask** (0 = background, 1 + the item's class elsewhere),
- the **instance masks** (the visible part of each item), its **boxes** (x0, y0, x1, y1, pixel
  edges, exclusive end) and **labels**,
- for change detection, a **before/after pair**: the same scene with items added, removed or moved,
  a fresh background noise and a brightness shift on the second image, and the **change mask**
  (pixels whose semantic label differs between the two).

The generator is deterministic for a seed. Training canvases draw their items from one half of the
source images and validation canvases from the other half (for Fashion-MNIST: its train and test
splits), so validation measures generalisation to unseen item images, not memorised ones. One
generator serves segmentation, change detection, detection and multi-task work
(:func:`make_canvases`, :func:`make_change_pairs`); the ``canvas`` and ``canvas-change`` dataset URIs
wrap them as :class:`~vitkit.data.ImageDataset` (``load_canvas``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vitkit.data.dataset import ImageDataset
from vitkit.data.dense import CHANGE_CLASSES
from vitkit.data.sources import load_digits, load_fashion_mnist
from vitkit.errors import VitkitError

BACKGROUND = "background"


class CanvasOptions(BaseModel):
    """``canvas:key=value,...`` (every key optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(64, ge=16, le=1024, description="canvas side in pixels")
    train: int = Field(2000, ge=2, description="training canvases")
    val: int = Field(500, ge=2, description="validation canvases")
    min_items: int = Field(1, ge=0, description="fewest items per canvas")
    max_items: int = Field(5, ge=1, le=32, description="most items per canvas")
    min_scale: float = Field(0.25, gt=0, le=1, description="smallest item side, as a fraction of the canvas")
    max_scale: float = Field(0.5, gt=0, le=1, description="largest item side, as a fraction of the canvas")
    source: str = Field("digits", pattern="^(digits|fashion-mnist)$", description="item images")
    classes: int = Field(10, ge=1, le=10, description="use the source's first N classes only")
    same_class: bool = Field(
        False, description="every item of a canvas from one class (a canvas = one 'patient')"
    )
    seed: int = Field(0, description="generator seed")

    @model_validator(mode="after")
    def _ranges(self) -> CanvasOptions:
        if self.min_items > self.max_items:
            raise ValueError(f"min_items {self.min_items} > max_items {self.max_items}")
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale {self.min_scale} > max_scale {self.max_scale}")
        if round(self.min_scale * self.size) < 4:
            raise ValueError(f"min_scale {self.min_scale} makes items under 4 px on a {self.size} px canvas")
        return self


def parse_canvas_options(arg: str, uri: str) -> CanvasOptions:
    """``"size=32,train=200"`` -> options; one-line errors naming the URI."""
    raw: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in arg.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise VitkitError(
                f"dataset '{uri}': option '{item}' is not key=value (e.g. canvas:size=64,train=500)"
            )
        raw[key.strip()] = value.strip()
    try:
        return CanvasOptions(**raw)
    except ValidationError as e:
        from vitkit.registry import format_validation_error

        raise VitkitError(format_validation_error(e, f"dataset '{uri}'")) from e


@dataclass
class Item:
    """One pasted item: its pixels and opaque mask at their pasted size, class and top-left corner."""

    pixels: torch.Tensor  # (h, w) float in [0, 1]
    mask: torch.Tensor  # (h, w) bool
    label: int  # class index of the source (0-based, without background)
    y: int
    x: int


@dataclass
class Canvases:
    """Generated canvases with every label a dense or instance task needs."""

    images: torch.Tensor  # (N, 1, S, S) uint8
    semantic: torch.Tensor  # (N, S, S) int64, 0 = background, 1 + class
    instances: list[torch.Tensor] = field(default_factory=list)  # per canvas (k, S, S) bool
    boxes: list[torch.Tensor] = field(default_factory=list)  # per canvas (k, 4) float32 xyxy
    labels: list[torch.Tensor] = field(default_factory=list)  # per canvas (k,) int64, 1 + class
    classes: list[str] = field(default_factory=list)  # background first


@dataclass
class ChangePairs:
    """Before/after canvases and the change mask between them."""

    before: torch.Tensor  # (N, 1, S, S) uint8
    after: torch.Tensor  # (N, 1, S, S) uint8
    change: torch.Tensor  # (N, S, S) int64, 1 where the semantic label differs
    semantic_before: torch.Tensor
    semantic_after: torch.Tensor


def item_pool(source: str, split: str, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images (M, h, w) float in [0, 1], labels (M,), class names) of one half of the source, its
    first ``classes`` classes."""
    if source == "digits":
        d = load_digits()
        keep = torch.arange(len(d)) % 2 == (0 if split == "train" else 1)
    else:
        d = load_fashion_mnist()["train" if split == "train" else "test"]
        keep = torch.ones(len(d), dtype=torch.bool)
    keep &= d.targets < classes
    return d.images[keep, 0].float() / 255.0, d.targets[keep], list(d.classes[:classes])


def _draw_item(
    pool: tuple[torch.Tensor, torch.Tensor],
    o: CanvasOptions,
    rng: np.random.Generator,
    only: int | None = None,
) -> Item:
    images, labels = pool
    if only is None:
        i = int(rng.integers(len(images)))
    else:  # an item of class `only`
        idx = torch.nonzero(labels == only).flatten()
        i = int(idx[int(rng.integers(len(idx)))])
    side = int(rng.integers(round(o.min_scale * o.size), round(o.max_scale * o.size) + 1))
    src = images[i][None, None]
    pix = F.interpolate(src, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    pix = pix.clamp(0, 1)
    mask = pix > 0.35  # the item's strokes/body; its own dark background stays transparent
    y = int(rng.integers(0, o.size - side + 1))
    x = int(rng.integers(0, o.size - side + 1))
    return Item(pix, mask, int(labels[i]), y, x)


def render(
    items: list[Item], size: int, rng: np.random.Generator, brightness: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Paint ``items`` in order over a noisy background: (image (S, S) uint8, semantic (S, S) int64,
    visible instance masks (one per item, occlusion applied))."""
    img = torch.from_numpy(rng.uniform(0.0, 0.2, (size, size)).astype(np.float32))
    semantic = torch.zeros(size, size, dtype=torch.long)
    owner = torch.full((size, size), -1, dtype=torch.long)
    for k, it in enumerate(items):
        h, w = it.mask.shape
        region = (slice(it.y, it.y + h), slice(it.x, it.x + w))
        img[region] = torch.where(it.mask, 0.25 + 0.75 * it.pixels, img[region])
        semantic[region] = torch.where(it.mask, it.label + 1, semantic[region])
        owner[region] = torch.where(it.mask, k, owner[region])
    img = (img + brightness).clamp(0, 1)
    visible = [owner == k for k in range(len(items))]
    return (img * 255).round().to(torch.uint8), semantic, visible


def _box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _scene(pool, o: CanvasOptions, rng: np.random.Generator) -> list[Item]:
    n = int(rng.integers(o.min_items, o.max_items + 1))
    if o.same_class:  # drawn after n, so canvases without the option are the same as before it existed
        only = int(rng.integers(o.classes))
        return [_draw_item(pool, o, rng, only) for _ in range(n)]
    return [_draw_item(pool, o, rng) for _ in range(n)]


def make_canvases(n: int, options: CanvasOptions, split: str = "train") -> Canvases:
    """``n`` canvases with semantic and instance masks, boxes and labels (deterministic)."""
    images, labels, names = item_pool(options.source, split, options.classes)
    rng = np.random.default_rng([options.seed, 0 if split == "train" else 1])
    out = Canvases(
        torch.zeros(n, 1, options.size, options.size, dtype=torch.uint8),
        torch.zeros(n, options.size, options.size, dtype=torch.long),
        classes=[BACKGROUND, *names],
    )
    for i in range(n):
        items = _scene((images, labels), options, rng)
        img, sem, visible = render(items, options.size, rng)
        out.images[i, 0], out.semantic[i] = img, sem
        keep = [k for k, m in enumerate(visible) if int(m.sum()) >= 4]  # fully hidden items are no instance
        out.instances.append(
            torch.stack([visible[k] for k in keep])
            if keep
            else torch.zeros(0, options.size, options.size, dtype=torch.bool)
        )
        out.boxes.append(torch.stack([_box(visible[k]) for k in keep]) if keep else torch.zeros(0, 4))
        out.labels.append(torch.tensor([items[k].label + 1 for k in keep], dtype=torch.long))
    return out


def _change_scene(before: list[Item], pool, o: CanvasOptions, rng: np.random.Generator) -> list[Item]:
    """The after-scene: 1-2 events (add an item, remove one, move one); one pair in ten is unchanged."""
    after = list(before)
    if rng.random() < 0.1:
        return after
    for _ in range(int(rng.integers(1, 3))):
        event = rng.choice(["add", "remove", "move"]) if after else "add"
        if event == "add" and len(after) < o.max_items + 2:
            after.append(_draw_item(pool, o, rng))
        elif event == "remove" and after:
            after.pop(int(rng.integers(len(after))))
        elif after:
            k = int(rng.integers(len(after)))
            it = after[k]
            side = it.mask.shape[0]
            y, x = int(rng.integers(0, o.size - side + 1)), int(rng.integers(0, o.size - side + 1))
            after[k] = Item(it.pixels, it.mask, it.label, y, x)
    return after


def make_change_pairs(n: int, options: CanvasOptions, split: str = "train") -> ChangePairs:
    """``n`` before/after pairs and their change masks (deterministic)."""
    images, labels, _ = item_pool(options.source, split, options.classes)
    rng = np.random.default_rng([options.seed, 2 if split == "train" else 3])
    s = options.size
    before = torch.zeros(n, 1, s, s, dtype=torch.uint8)
    after = torch.zeros_like(before)
    sem_a = torch.zeros(n, s, s, dtype=torch.long)
    sem_b = torch.zeros_like(sem_a)
    for i in range(n):
        scene = _scene((images, labels), options, rng)
        later = _change_scene(scene, (images, labels), options, rng)
        a, sa, _ = render(scene, s, rng)
        # a second acquisition: new sensor noise and a global brightness shift, which is no change
        b, sb, _ = render(later, s, rng, brightness=float(rng.uniform(-0.08, 0.08)))
        before[i, 0], after[i, 0], sem_a[i], sem_b[i] = a, b, sa, sb
    return ChangePairs(before, after, (sem_a != sem_b).long(), sem_a, sem_b)


def load_canvas(arg: str, uri: str, change: bool = False, boxes: bool = False) -> dict[str, ImageDataset]:
    """The ``canvas`` (semantic masks), ``canvas-change`` (image pairs, change masks) or
    ``canvas-boxes`` (boxes of the items' visible parts, classes without the background) dataset:
    its train and validation splits."""
    o = parse_canvas_options(arg, uri)
    out: dict[str, ImageDataset] = {}
    for split, n in (("train", o.train), ("val", o.val)):
        info = {"canvas": o.model_dump()}
        if change:
            p = make_change_pairs(n, o, split)
            images = torch.cat([p.before, p.after], dim=1)
            out[split] = ImageDataset(images, p.change, list(CHANGE_CLASSES), uri, {**info, "pair": True})
        elif boxes:
            from vitkit.data.boxes import pack_boxes

            c = make_canvases(n, o, split)
            targets = pack_boxes(c.boxes, [lab - 1 for lab in c.labels])  # labels 1 + class -> class
            out[split] = ImageDataset(c.images, targets, c.classes[1:], uri, {**info, "boxes": True})
        else:
            c = make_canvases(n, o, split)
            out[split] = ImageDataset(c.images, c.semantic, c.classes, uri, info)
    return out
