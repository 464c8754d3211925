"""Issue 25, data: bad datasets end in one ``error:`` line (exit 2) naming the file/array/field, or
one ``warning:`` line where the user may mean it. Each case is tiny and fails before training."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

QUICK = ["--model", "vitkit_nano_p4_16", "--epochs", "1", "--quiet", "--no-tensorboard"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A valid PNG of a few bytes whose header declares 30000x30000 pixels."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _chunk(b"IEND", b"")


def _folder(root: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _npz(path: Path, x: np.ndarray | None = None, y: np.ndarray | None = None, **extra) -> None:
    x = np.zeros((8, 8, 8), np.uint8) if x is None else x
    y = np.arange(len(x)) % 2 if y is None else y
    np.savez(path, x=x, y=y, **extra)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Every bad dataset of the table, written once per test (all tiny)."""
    d = tmp_path / "data"
    bomb = _folder(d / "bomb")
    (bomb / "a" / "bomb.png").write_bytes(bomb_png())
    _folder(d / "good")
    _folder(d / "oneclass", classes=("only",))
    _folder(d / "singletons", n=1)  # one image per class: nothing to hold out
    _folder(d / "markup", classes=("[bold]",))  # rich markup in a name must print as typed

    (d / "latin1.csv").write_bytes("path,label\ngood/a/0.png,a\ngood/b/0.png,caf\xe9\n".encode("latin-1"))
    (d / "extra.csv").write_text("path,label\ngood/a/0.png,a,surplus\n")
    (d / "nopath.csv").write_text("label,path\na,good/a/0.png\nb\n")
    (d / "onehot2.csv").write_text("path,cat,dog\ngood/a/0.png,1,0\ngood/b/0.png,0,2\n")
    (d / "emptylabel.csv").write_text("path,label\ngood/a/0.png,a|\ngood/b/0.png,b\n")
    (d / "oneclass.csv").write_text("path,label\ngood/a/0.png,cat\ngood/b/0.png,cat\n")

    rng = np.random.default_rng(0)
    nan = rng.random((8, 8, 8))
    nan[3, 2, 1] = np.nan
    _npz(d / "nan.npz", nan)
    _npz(d / "inf.npz", np.full((8, 8, 8), np.inf, np.float32))
    _npz(d / "x255.npz", rng.random((8, 8, 8)) * 255)
    _npz(d / "xint.npz", rng.integers(0, 255, (8, 8, 8)))
    _npz(d / "x2d.npz", np.zeros((8, 64), np.uint8))
    _npz(d / "x5d.npz", np.zeros((8, 1, 1, 8, 8), np.uint8))
    _npz(d / "xempty.npz", np.zeros((0, 8, 8), np.uint8), np.zeros(0, int))
    _npz(d / "ymh.npz", y=np.tile([[0.0, 2.0]], (8, 1)))
    _npz(d / "ymhnan.npz", y=np.full((8, 2), np.nan))
    _npz(d / "yfloat.npz", y=np.arange(8) % 2 * 1.0)
    _npz(d / "yscalar.npz", y=np.array(3))
    _npz(d / "ybig.npz", y=np.arange(8) * 10**9)
    _npz(d / "yone.npz", y=np.zeros(8, int))
    _npz(d / "names.npz", y=np.arange(8) % 3, classes=np.array(["a", "b"]))
    _npz(d / "dupnames.npz", classes=np.array(["a", "a"]))
    np.save(d / "single.npy", np.zeros(3))
    (d / "single.npz").write_bytes((d / "single.npy").read_bytes())
    (d / "junk.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    # what the property tests (tests/data/test_data_properties.py) throw at the loaders, via the CLI
    noise = np.random.default_rng(1)
    for c in ("a", "b"):
        (d / "noise" / c).mkdir(parents=True)
        for ext in (".png", ".jpg", ".webp"):
            (d / "noise" / c / f"x{ext}").write_bytes(noise.bytes(64))
    (d / "noise.csv").write_bytes(b"path,label\n" + noise.bytes(64).replace(b"\n", b"\xff") + b"\xff")
    return d


@pytest.mark.parametrize(
    "args,message",
    [
        # item 3: images, CSV text, npz arrays
        (["--data", "folder:{d}/bomb", "--img-size", "16", "--strict"],
         r"cannot read image '.*bomb\.png': refused as a possible decompression bomb"),
        (["--data", "csv:{d}/latin1.csv"], r"csv:.*latin1\.csv line 3: not UTF-8 text \(byte 0xe9"),
        (["--data", "csv:{d}/extra.csv"], r"extra\.csv line 2: 3 fields but the header names 2"),
        (["--data", "csv:{d}/nopath.csv"], r"nopath\.csv line 3: empty 'path'"),
        (["--data", "csv:{d}/onehot2.csv"], r"onehot2\.csv line 3: column 'dog' holds '2'"),
        (["--data", "csv:{d}/emptylabel.csv"], r"emptylabel\.csv line 2: empty label in 'a\|'"),
        (["--data", "npz:{d}/nan.npz"], r"nan\.npz: 'x' holds 1 NaN/inf value\(s\), the first in image 3"),
        (["--data", "npz:{d}/inf.npz"], r"inf\.npz: 'x' holds 512 NaN/inf"),
        (["--data", "npz:{d}/x255.npz"], r"x255\.npz: 'x' floats range .*divide by 255"),
        (["--data", "npz:{d}/xint.npz"], r"xint\.npz: 'x' has dtype int64.*astype\(np\.uint8\)"),
        (["--data", "npz:{d}/x2d.npz"], r"x2d\.npz: 'x' has shape \(8, 64\); expected \(N,H,W\)"),
        (["--data", "npz:{d}/x5d.npz"], r"x5d\.npz: 'x' has shape \(8, 1, 1, 8, 8\)"),
        (["--data", "npz:{d}/xempty.npz"], r"xempty\.npz: 'x' has shape \(0, 1, 8, 8\); expected at least one"),
        (["--data", "npz:{d}/ymhnan.npz"], r"ymhnan\.npz: 'y' is multi-hot .* only 0 and 1, found nan"),
        (["--data", "npz:{d}/yfloat.npz"], r"yfloat\.npz: 'y' holds floats"),
        (["--data", "npz:{d}/yscalar.npz"], r"yscalar\.npz: 'y' must be integer labels .* got int64 \(\)"),
        (["--data", "npz:{d}/ybig.npz"], r"ybig\.npz: 'y' holds label 7000000000"),
        (["--data", "npz:{d}/names.npz"], r"names\.npz: 'y' holds label 2 but 'classes' names only 2"),
        (["--data", "npz:{d}/dupnames.npz"], r"dupnames\.npz: 'classes' names 'a' twice"),
        (["--data", "npz:{d}/single.npz"], r"single\.npz: holds a single array \(\.npy\)"),
        (["--data", "npz:{d}/junk.npz"], r"junk\.npz: not a readable \.npz archive"),
        # item 4: labels, classes, splits, sizes
        (["--data", "npz:{d}/ymh.npz"], r"ymh\.npz: 'y' is multi-hot \(N, K\) and must hold only 0 and 1, found 2\.0 at row 0, column 1"),
        (["--data", "npz:{d}/yone.npz"], r"yone\.npz: all 8 images are of one class \('0'\); a classifier needs .*2 classes"),
        (["--data", "folder:{d}/oneclass", "--img-size", "16"], r"all 4 images are of one class \('only'\)"),
        (["--data", "csv:{d}/oneclass.csv", "--img-size", "16"], r"oneclass\.csv: all 2 images are of one class \('cat'\)"),
        (["--data", "folder:{d}/singletons", "--img-size", "16", "--val-fraction", "0.5"],
         r"val_fraction 0\.5 leaves no validation images: no class has 2 or more images"),
        (["--data", "folder:{d}/good", "--img-size", "18"],
         r"img_size 18 is not a multiple of the patch size 4 of 'vitkit_nano_p4_16' .*use img_size 16 or 20"),
        (["--data", "digits", "--img-size", "2"], r"img_size 2 .*use img_size 4\b"),
        (["--data", "digits", "--val-fraction", "1.0"], r"field 'val_fraction'"),
        (["--data", "folder:{d}/noise", "--img-size", "16"], r"folder:.*noise: none of the 6 image files could be read"),
        (["--data", "csv:{d}/noise.csv"], r"noise\.csv line 2: not UTF-8 text \(byte 0x"),
        # names holding rich markup: printed as typed, not parsed (was a MarkupError traceback)
        (["--data", "folder:{d}/nowhere[/x]"], r"image folder '.*nowhere\[/x\]' does not exist"),
        (["--data", "folder:{d}/markup", "--img-size", "16"], r"one class \('\[bold\]'\)"),
    ],
)  # fmt: skip
def test_bad_dataset_is_one_line_exit_2(bad_input, data_dir, tmp_path, args, message):
    argv = ["train", *QUICK, *[a.replace("{d}", str(data_dir)) for a in args], "-o", tmp_path / "run"]
    bad_input(argv, message, workdir=tmp_path)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "folder:{d}/bomb", "--img-size", "16"],
         r"warning: folder:.*bomb: skipped 1 unreadable image\(s\), e\.g\. '.*bomb\.png': refused as a possible decompression bomb"),
        (["--data", "digits", "--val-fraction", "0.999"],
         r"warning: digits: the training split has only 10 images for 10 classes, fewer than the 1787 held out by val_fraction 0\.999"),
    ],
)  # fmt: skip
def test_data_a_user_may_mean_trains_with_one_warning(bad_input, data_dir, tmp_path, args, message):
    out = tmp_path / "run"
    text = bad_input(
        ["train", *QUICK, *[a.replace("{d}", str(data_dir)) for a in args], "-o", out], message, code=0
    )
    warned = [ln for ln in text.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and re.search(message, warned[0]), text  # the whole warning on one line
    assert (out / "model.safetensors").is_file()
