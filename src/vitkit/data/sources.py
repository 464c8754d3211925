"""Dataset readers: the embedded and packaged sets and image-label files on disk (which URI names
which: vitkit.data.uris)."""

from __future__ import annotations

import csv
import gzip
import io
import os
import struct
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitkit.data.dataset import ImageDataset
from vitkit.errors import VitkitError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class VitkitDataWarning(UserWarning):
    """Data problems that were worked around (e.g. corrupt images skipped)."""


# -- embedded and packaged datasets -------------------------------------------------------------
def load_digits() -> ImageDataset:
    """scikit-learn's bundled digits (the test half of UCI optdigits), no download."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return ImageDataset(
        torch.from_numpy(images)[:, None],
        torch.from_numpy(d.target.astype(np.int64)),
        [str(i) for i in range(10)],
        "digits",
    )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, ImageDataset]:
    root = Path(root or os.environ.get("VITKIT_FASHION_MNIST_ROOT", FASHION_MNIST_ROOT))
    names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    missing = [n for n in names if not (root / f"{n}.gz").is_file()]
    if missing:
        raise VitkitError(
            f"fashion-mnist: {missing[0]}.gz not found in {root}; install the data with "
            "`apt-get install dataset-fashion-mnist` (Debian) or set VITKIT_FASHION_MNIST_ROOT to a folder holding the IDX .gz files"
        )
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
        y = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        out[split] = ImageDataset(
            torch.from_numpy(x.copy()), torch.from_numpy(y), list(FASHION_MNIST_CLASSES), "fashion-mnist"
        )
    return out


# -- files on disk --------------------------------------------------------------------------------
# What PIL's decoders raise on damaged or hostile files. Besides OSError/SyntaxError/ValueError,
# truncated or bit-flipped headers reach plain Python errors inside the format plugins
# (struct.error, IndexError, ZeroDivisionError, ...): all mean "this file is not a usable image".
_DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
    EOFError,
    struct.error,
    zlib.error,
)


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (the CLI promises one ``error:`` line)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _show(text: object) -> str:
    """User text (a file name, a CSV cell) fit for a one-line message: characters that are not
    printable, line breaks among them (\\n, \\v, \\u2028, ...), are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _read_image(path: Path, img_size: int | None) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        gray = im.mode in ("L", "1", "I", "I;16", "F", "LA")
        im = im.convert("L" if gray else "RGB")
        if img_size is not None and im.size != (img_size, img_size):
            im = im.resize((img_size, img_size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _read_images(
    paths: list[Path], img_size: int | None, strict: bool, source: str
) -> tuple[list[np.ndarray | None], int]:
    reasons: dict[Path, str] = {}

    def read(p: Path) -> np.ndarray | None:
        try:
            return _read_image(p, img_size)
        except Image.DecompressionBombError as e:
            # Not an OSError: PIL refuses files whose header declares more pixels than its limit
            # (a 30000x30000 PNG of a few bytes); a dataset image that large is unusable anyway.
            why = f"refused as a possible decompression bomb: {_one_line(e)}"
            if strict:
                raise VitkitError(f"{source}: cannot read image '{_show(p)}': {why}") from e
            reasons[p] = why
            return None
        except _DECODE_ERRORS as e:
            if strict:
                raise VitkitError(f"{source}: cannot read image '{_show(p)}': {_one_line(e)}") from e
            reasons[p] = _one_line(e)
            return None

    from vitkit.progress import track

    with ThreadPoolExecutor(max_workers=4) as pool:
        arrays = list(track(pool.map(read, paths), total=len(paths), description=f"reading {source}"))
    bad = [p for p, a in zip(paths, arrays) if a is None]
    if bad:
        warnings.warn(
            f"{source}: skipped {len(bad)} unreadable image(s), e.g. '{_show(bad[0])}': {reasons.get(bad[0], '?')} "
            "(use --strict to fail instead)",
            VitkitDataWarning,
            stacklevel=3,
        )
    return arrays, len(bad)


def _stack(arrays: list[np.ndarray], source: str) -> torch.Tensor:
    channels = max(a.shape[0] for a in arrays)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise VitkitError(
            f"{source}: images have different sizes {sorted(shapes)[:3]}; give --img-size so they are resized on load"
        )
    if channels == 3:
        arrays = [np.repeat(a, 3, 0) if a.shape[0] == 1 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays))


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_folder(path: str, img_size: int | None = None, strict: bool = False) -> dict[str, ImageDataset]:
    root = Path(path)
    if not root.is_dir():
        raise VitkitError(f"image folder '{path}' does not exist")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in split_dirs and ("val" in split_dirs or "test" in split_dirs):
        classes = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
        return {
            s: _load_class_folders(d, img_size, strict, f"folder:{d}", classes) for s, d in split_dirs.items()
        }
    return {"all": _load_class_folders(root, img_size, strict, f"folder:{path}", None)}


def _load_class_folders(
    root: Path, img_size: int | None, strict: bool, source: str, classes: list[str] | None
) -> ImageDataset:
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    classes = classes or found
    if not classes:
        raise VitkitError(f"{source}: no class sub-folders (expected {root}/<class name>/<image files>)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise VitkitError(
            f"{source}: class folder '{_show(unknown[0])}' is not among the training classes {classes}"
        )
    paths, labels = [], []
    for i, c in enumerate(classes):
        if (root / c).is_dir():
            files = _list_images(root / c)
            paths += files
            labels += [i] * len(files)
    if not paths:
        raise VitkitError(
            f"{source}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    arrays, _ = _read_images(paths, img_size, strict, source)
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        raise VitkitError(f"{source}: none of the {len(paths)} image files could be read")
    images = _stack([arrays[i] for i in keep], source)
    targets = torch.tensor([labels[i] for i in keep], dtype=torch.long)
    return ImageDataset(images, targets, list(classes), source, {"files": [str(paths[i]) for i in keep]})


_PATH_COLUMNS = ("path", "image", "filename", "file")
_LABEL_COLUMNS = ("label", "labels")
_LABEL_SEPARATORS = ("|", ";")


def _read_csv_rows(file: Path, source: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and ``(line number, row)`` pairs of a UTF-8 CSV; one-line errors for undecodable text."""
    raw = file.read_bytes()
    try:
        # utf-8-sig: spreadsheet programs write a byte-order mark, which would otherwise become part
        # of the first column's name (and hide the 'path' column).
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise VitkitError(
            f"{source} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save the CSV as UTF-8"
        ) from e
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict]] = []
    try:
        for r in reader:
            rows.append((reader.line_num, r))
    except csv.Error as e:
        raise VitkitError(f"{source} line {reader.line_num}: not valid CSV ({_one_line(e)})") from e
    return list(reader.fieldnames or []), rows


def _is_file(p: Path) -> bool:
    # Path.is_file raises for names the OS rejects outright (too long): such a path is just missing.
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


def load_csv(path: str, img_size: int | None = None, strict: bool = False) -> ImageDataset:
    """CSV (UTF-8) with a header. Either ``path,label`` (``label`` may hold ``a|b`` for several
    labels) or ``path,<class 1>,<class 2>,...`` with 0/1 columns (multi-hot). Paths are relative to
    the CSV."""
    file = Path(path)
    source = f"csv:{path}"
    if not file.is_file():
        raise VitkitError(f"CSV file '{path}' does not exist")
    columns, numbered = _read_csv_rows(file, source)
    if not numbered:
        raise VitkitError(f"{source}: no rows (expected a header line and one row per image)")
    lines = [n for n, _ in numbered]
    rows = [r for _, r in numbered]
    for n, r in numbered:
        if None in r:  # csv.DictReader files fields beyond the header under the key None
            raise VitkitError(
                f"{source} line {n}: {len(columns) + len(r[None])} fields but the header names {len(columns)}"
            )
    lower = {c.lower().strip(): c for c in columns}
    path_col = next((lower[c] for c in _PATH_COLUMNS if c in lower), None)
    if path_col is None:
        raise VitkitError(
            f"{source}: no image path column (expected one of {', '.join(_PATH_COLUMNS)}; found {columns})"
        )
    label_col = next((lower[c] for c in _LABEL_COLUMNS if c in lower), None)

    if label_col is not None:
        per_row = []
        for n, r in numbered:
            raw = (r.get(label_col) or "").strip()
            if not raw:
                raise VitkitError(f"{source} line {n}: empty '{_show(label_col)}'")
            sep = next((s for s in _LABEL_SEPARATORS if s in raw), None)
            labs = [x.strip() for x in raw.split(sep)] if sep else [raw]
            if not all(labs):
                raise VitkitError(
                    f"{source} line {n}: empty label in '{_show(raw)}' (labels are separated by | or ;)"
                )
            per_row.append(labs)
        classes = sorted({lab for labs in per_row for lab in labs}, key=_natural_key)
        index = {c: i for i, c in enumerate(classes)}
        multilabel = any(len(labs) > 1 for labs in per_row)
        if multilabel:
            targets = torch.zeros(len(rows), len(classes))
            for i, labs in enumerate(per_row):
                targets[i, [index[x] for x in labs]] = 1.0
        else:
            targets = torch.tensor([index[labs[0]] for labs in per_row], dtype=torch.long)
    else:
        classes = [c for c in columns if c != path_col]
        if not classes:
            raise VitkitError(
                f"{source}: no label column (expected 'label' or one 0/1 column per class; found {columns})"
            )
        values = []
        for n, r in numbered:
            row = []
            for c in classes:
                v = (r.get(c) or "").strip()
                try:
                    x = float(v) if v else 0.0  # an empty cell means "not this class"
                except ValueError:
                    x = float("nan")
                if x not in (0.0, 1.0):
                    raise VitkitError(
                        f"{source} line {n}: column '{_show(c)}' holds '{_show(v[:20])}'; class columns must hold 0 or 1 "
                        "when there is no 'label' column"
                    )
                row.append(x)
            values.append(row)
        targets = torch.tensor(values)

    base = file.parent
    paths = []
    for n, r in numbered:
        name = (r.get(path_col) or "").strip()
        if not name:
            raise VitkitError(f"{source} line {n}: empty '{_show(path_col)}' (expected an image path)")
        paths.append(Path(name) if os.path.isabs(name) else base / name)
    images, keep = read_listed_images(paths, img_size, strict, source, base, lines)
    return ImageDataset(
        images,
        targets[keep],
        classes,
        source,
        {"files": [str(paths[i]) for i in keep]},
    )


def _natural_key(s: str):
    return (0, int(s)) if s.isdigit() else (1, s)


# What numpy raises on a damaged archive or member (a bad zip directory, a truncated or corrupt
# deflate stream, a header declaring more data than there is).
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError)
# Unnamed integer labels above this are taken for ids, not class indices: each index up to the
# largest becomes a class (and an output of the head).
_MAX_UNNAMED_CLASSES = 100_000


def read_listed_images(
    paths: list[Path],
    img_size: int | None,
    strict: bool,
    source: str,
    base: Path,
    lines: list[int] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The images a CSV lists, stacked, and the indices of those that could be read (unreadable ones
    are skipped with a counted warning unless ``strict``); a missing file is refused in one line,
    naming its CSV line when ``lines`` are given."""
    missing = [i for i, p in enumerate(paths) if not _is_file(p)]
    if missing:
        where = f"{source} line {lines[missing[0]]}" if lines is not None else source
        raise VitkitError(
            f"{where}: image '{_show(paths[missing[0]])}' not found ({len(missing)} missing in all; paths are relative to {base})"
        )
    arrays, _ = _read_images(paths, img_size, strict, source)
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        raise VitkitError(f"{source}: none of the {len(paths)} images could be read")
    return _stack([arrays[i] for i in keep], source), keep


def load_npz(path: str) -> ImageDataset:
    """Arrays ``x`` (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or float in [0, 1]; ``y`` (N,) integer
    labels or (N,K) multi-hot 0/1; optional ``classes`` (K,) names and ``groups`` (N,) integer group
    ids (``info["groups"]``: a classifier's evaluation then reports group-level metrics too)."""
    file = Path(path)
    source = f"npz:{path}"
    if not file.is_file():
        raise VitkitError(f"npz file '{path}' does not exist")
    try:
        arrays = np.load(file, allow_pickle=False)
    except _NPZ_ERRORS as e:
        raise VitkitError(f"{source}: not a readable .npz archive ({_one_line(e)})") from e
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise VitkitError(
            f"{source}: holds a single array (.npy), expected an .npz archive of 'x' images and 'y' labels"
        )
    with arrays:
        for key in ("x", "y"):
            if key not in arrays.files:
                raise VitkitError(
                    f"{source}: missing array '{key}' (found {sorted(arrays.files)}; expected 'x' images and 'y' labels)"
                )
        try:
            x, y = arrays["x"], arrays["y"]
            names = arrays["classes"] if "classes" in arrays.files else None
            groups = arrays["groups"] if "groups" in arrays.files else None
        except ValueError as e:  # object arrays would need unpickling, which vitkit never does
            raise VitkitError(
                f"{source}: cannot read its arrays without unpickling ({_one_line(e)}); save plain numeric arrays"
            ) from e
        except _NPZ_ERRORS as e:
            raise VitkitError(f"{source}: a damaged array in the archive ({_one_line(e)})") from e
    x = _npz_images(x, source)
    targets, k = _npz_targets(y, len(x), source)
    classes = _npz_class_names(names, source) if names is not None else None
    if classes is not None:
        if targets.ndim == 1 and k > len(classes):
            raise VitkitError(
                f"{source}: 'y' holds label {k - 1} but 'classes' names only {len(classes)} classes (labels are 0..K-1)"
            )
        if targets.ndim == 2 and k != len(classes):
            raise VitkitError(f"{source}: 'classes' names {len(classes)} classes but 'y' has {k} columns")
    else:
        classes = [str(i) for i in range(k)]
    info = {}
    if groups is not None:  # optional per-sample group ids (a patient per image): group-level evaluation
        if groups.shape != (len(x),) or not np.issubdtype(groups.dtype, np.integer):
            raise VitkitError(
                f"{source}: 'groups' must be {len(x)} integers (one group id per image), got {groups.dtype} {groups.shape}"
            )
        info["groups"] = torch.from_numpy(groups.astype(np.int64))
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(x)), targets, classes, source, info)


def _npz_images(x: np.ndarray, source: str) -> np.ndarray:
    """``x`` as uint8 (N, C, H, W), or a one-line error naming the problem."""
    expected = "expected uint8 or floats in [0, 1]"
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        hint = ""
        if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 255:
            hint = " (its values fit: save x.astype(np.uint8))"
        raise VitkitError(f"{source}: 'x' has dtype {x.dtype}; {expected}{hint}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise VitkitError(
            f"{source}: 'x' has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W) with C 1 or 3"
        )
    if x.size == 0:
        raise VitkitError(
            f"{source}: 'x' has shape {x.shape}; expected at least one image of at least 1x1 pixels"
        )
    if x.dtype != np.uint8:
        finite = np.isfinite(x)
        if not finite.all():
            first = int(np.argwhere(~finite)[0][0])
            raise VitkitError(
                f"{source}: 'x' holds {int((~finite).sum())} NaN/inf value(s), the first in image {first}; "
                f"{expected}"
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            hint = " (looks like 0..255: divide by 255 or save uint8)" if lo >= 0 and hi <= 255 else ""
            raise VitkitError(f"{source}: 'x' floats range {lo:g}..{hi:g}; {expected}{hint}")
        x = np.round(x.astype(np.float32) * 255).astype(np.uint8)
    return x


def _npz_targets(y: np.ndarray, n: int, source: str) -> tuple[torch.Tensor, int]:
    """``y`` as int64 (N,) labels or float32 (N, K) multi-hot, and the class count K."""
    if y.ndim not in (1, 2) or y.dtype.kind not in "biuf":
        raise VitkitError(
            f"{source}: 'y' must be integer labels (N,) or multi-hot 0/1 (N, K), got {y.dtype} {y.shape}"
        )
    if len(y) != n:
        raise VitkitError(f"{source}: 'x' has {n} images but 'y' has {len(y)} labels")
    if y.ndim == 2:
        if y.shape[1] == 0:
            raise VitkitError(f"{source}: 'y' has shape {y.shape}: multi-hot labels need at least one column")
        # Anything but 0/1 makes BCE negative or unbounded and AUROC undefined.
        bad = ~((y == 0) | (y == 1))
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            raise VitkitError(
                f"{source}: 'y' is multi-hot (N, K) and must hold only 0 and 1, found {y[r, c].item()!r} at row {r}, "
                f"column {c} ({int(bad.sum())} such values)"
            )
        return torch.from_numpy(y.astype(np.float32)), y.shape[1]
    if y.dtype.kind == "f":
        raise VitkitError(
            f"{source}: 'y' holds floats ({y.dtype}); expected integer class indices (N,) or multi-hot 0/1 (N, K)"
        )
    if y.min() < 0:
        raise VitkitError(f"{source}: 'y' holds negative labels (e.g. {int(y.min())}); expected 0..K-1")
    top = int(y.max())
    if top >= _MAX_UNNAMED_CLASSES:
        raise VitkitError(
            f"{source}: 'y' holds label {top}, i.e. {top + 1} classes; expected class indices 0..K-1 "
            f"(remap ids to indices, at most {_MAX_UNNAMED_CLASSES} classes)"
        )
    return torch.from_numpy(y.astype(np.int64)), top + 1


def _npz_class_names(names: np.ndarray, source: str) -> list[str]:
    if names.ndim != 1:
        raise VitkitError(f"{source}: 'classes' has shape {names.shape}; expected one name per class (K,)")
    out = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in names.tolist()]
    dup = next((c for i, c in enumerate(out) if c in out[:i]), None)
    if dup is not None:
        raise VitkitError(f"{source}: 'classes' names '{_show(dup)}' twice; class names must be unique")
    return out


def build_mosaic(data: ImageDataset, n: int | None = None, seed: int = 0) -> ImageDataset:
    """2x2 mosaics of 4 random images with multi-hot targets: a multi-label set from a single-label one."""
    if data.multilabel:
        raise VitkitError(f"mosaic:{data.name}: the source is already multi-label")
    g = torch.Generator().manual_seed(seed)
    n = n or len(data)
    idx = torch.randint(0, len(data), (n, 4), generator=g)
    x = data.images[idx]  # (n, 4, C, H, W)
    top = torch.cat([x[:, 0], x[:, 1]], dim=-1)
    bottom = torch.cat([x[:, 2], x[:, 3]], dim=-1)
    images = torch.cat([top, bottom], dim=-2).contiguous()
    targets = torch.zeros(n, data.num_classes)
    targets.scatter_(1, data.targets[idx], 1.0)
    return ImageDataset(images, targets, list(data.classes), f"mosaic:{data.name}")
