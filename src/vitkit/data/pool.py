"""A generated image-text pool with known noise, for DataComp-style experiments on this machine.

Real images (Fashion-MNIST's training split and, as off-target data, scikit-learn's digits scaled to
28 px) with templated captions, of which a controlled fraction is corrupted:

- ``mismatch``: the caption of another class (the commonest web-pair noise: alt text about
  something else);
- ``garbled``: a caption of random words/characters with no class name (boilerplate, file names);
- duplicates: a fraction of pairs repeated exactly (web pools are full of them).

Every row records what it is (``source``, ``label``, ``noise``), so a filter's output can be scored
against the truth; the training CSV has only ``path`` and ``caption`` (plus those columns, which the
image-text reader ignores). ``write_pool`` writes ``pool.csv`` + ``images/`` and, with ``shards``,
the same pairs as webdataset tar shards (``shards/pool-00000.tar`` ...).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitkit.errors import VitkitError

CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a {} on a plain background",
    "product shot: {}",
    "{}, grayscale catalogue image",
    "a small picture of a {}",
    "new {} for sale",
)
DIGIT_TEMPLATES = ("a handwritten {}", "scanned {} from a form", "the {} written by hand")
GARBLE_WORDS = (
    "img",
    "dsc",
    "jpeg",
    "click",
    "here",
    "free",
    "shipping",
    "best",
    "deal",
    "view",
    "more",
    "photo",
)


@dataclass(frozen=True)
class PoolRow:
    path: str
    caption: str
    source: str  # fashion-mnist | digits
    label: str  # the image's true class
    noise: str  # clean | mismatch | garbled | duplicate


def _caption(rng: random.Random, name: str, digit: bool) -> str:
    from vitkit.data.imagetext import readable_class_name

    templates = DIGIT_TEMPLATES if digit else CAPTION_TEMPLATES
    return rng.choice(templates).format(readable_class_name(name))


def _garble(rng: random.Random) -> str:
    words = [rng.choice(GARBLE_WORDS) for _ in range(rng.randint(2, 5))]
    words.append(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789_") for _ in range(rng.randint(4, 10)))
    )
    return " ".join(words)


def build_pool(
    size: int, *, corrupt: float = 0.4, duplicates: float = 0.1, off_target: float = 0.2, seed: int = 0
) -> tuple[list[np.ndarray], list[PoolRow]]:
    """``size`` pairs: ``off_target`` of them digits (reused when more than the 1,797 are needed), the
    rest Fashion-MNIST training images;
    ``corrupt`` of the captions corrupted (half mismatched, half garbled), then ``duplicates`` of the
    rows repeated (included in ``size``). Images are (28, 28) uint8."""
    from vitkit.data.sources import load_digits, load_fashion_mnist

    for name, v in (("corrupt", corrupt), ("duplicates", duplicates), ("off_target", off_target)):
        if not 0.0 <= v < 1.0:
            raise VitkitError(f"pool: {name} must be in [0, 1), got {v}")
    if size < 10:
        raise VitkitError(f"pool: size must be at least 10, got {size}")
    rng = random.Random(seed)
    fm = load_fashion_mnist()["train"]
    dg = load_digits()
    n_unique = size - round(size * duplicates)
    n_digits = round(n_unique * off_target)
    n_fm = n_unique - n_digits
    if n_fm > len(fm):
        raise VitkitError(f"pool: size {size} needs more than Fashion-MNIST's {len(fm)} training images")
    fm_idx = rng.sample(range(len(fm)), n_fm)
    # digits hold 1,797 images: a larger off-target share reuses them (with another caption each time)
    dg_idx = (
        rng.sample(range(len(dg)), n_digits)
        if n_digits <= len(dg)
        else [rng.randrange(len(dg)) for _ in range(n_digits)]
    )
    items: list[tuple[np.ndarray, str, str, list[str]]] = []
    for i in fm_idx:
        items.append((fm.images[i, 0].numpy(), "fashion-mnist", fm.classes[int(fm.targets[i])], fm.classes))
    for i in dg_idx:
        img = Image.fromarray(dg.images[i, 0].numpy()).resize((28, 28), Image.BILINEAR)
        items.append((np.asarray(img), "digits", dg.classes[int(dg.targets[i])], dg.classes))
    rng.shuffle(items)
    n_bad = round(len(items) * corrupt)
    bad = set(rng.sample(range(len(items)), n_bad))
    images, rows = [], []
    for j, (img, source, label, classes) in enumerate(items):
        digit = source == "digits"
        if j in bad and rng.random() < 0.5:
            other = rng.choice([c for c in classes if c != label])
            caption, noise = _caption(rng, other, digit), "mismatch"
        elif j in bad:
            caption, noise = _garble(rng), "garbled"
        else:
            caption, noise = _caption(rng, label, digit), "clean"
        images.append(img)
        rows.append(PoolRow(f"images/{j:06d}.png", caption, source, label, noise))
    for _ in range(size - len(rows)):  # exact duplicates of random rows (same image file, same caption)
        k = rng.randrange(n_unique)
        r = rows[k]
        rows.append(PoolRow(r.path, r.caption, r.source, r.label, "duplicate"))
    order = list(range(len(rows)))
    rng.shuffle(order)
    return images, [rows[i] for i in order]


POOL_COLUMNS = ("path", "caption", "source", "label", "noise")


def write_pool(
    out: str | Path,
    size: int,
    *,
    corrupt: float = 0.4,
    duplicates: float = 0.1,
    off_target: float = 0.2,
    seed: int = 0,
    shards: int = 0,
) -> Path:
    """Write the pool into ``out`` (``pool.csv``, ``images/``, and ``shards/`` when ``shards`` > 0);
    returns the CSV's path."""
    from vitkit.io import atomic_path

    out = Path(out)
    images, rows = build_pool(size, corrupt=corrupt, duplicates=duplicates, off_target=off_target, seed=seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(images):
        p = out / f"images/{j:06d}.png"
        with atomic_path(p) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    csv_path = out / "pool.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(POOL_COLUMNS)
        for r in rows:
            w.writerow([r.path, r.caption, r.source, r.label, r.noise])
    if shards:
        write_shards(out / "shards", [(out / r.path, r.caption) for r in rows], shards)
    return csv_path


def write_shards(folder: str | Path, pairs: list[tuple[Path, str]], shards: int) -> list[Path]:
    """Pairs as webdataset tar shards (``pool-00000.tar`` ...; ``KEY.png`` + ``KEY.txt``), written
    with webdataset's ``TarWriter``, each atomically."""
    import webdataset as wds

    from vitkit.io import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if shards < 1 or shards > len(pairs):
        raise VitkitError(f"shards: {shards} shards for {len(pairs)} pairs")
    per = -(-len(pairs) // shards)
    paths = []
    for s in range(shards):
        p = folder / f"pool-{s:05d}.tar"
        with atomic_path(p) as tmp, wds.TarWriter(str(tmp)) as sink:
            for k, (img, caption) in enumerate(pairs[s * per : (s + 1) * per]):
                sink.write({"__key__": f"{s:05d}{k:06d}", "png": Path(img).read_bytes(), "txt": caption})
        paths.append(p)
    return paths
