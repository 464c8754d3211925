"""segfolder:PATH and pairs:PATH: real PNG files, palette masks, one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import load_splits
from vitkit.errors import VitkitError


def _png(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    if palette:  # the indices stay; the palette only says how to colour them
        im = Image.frombytes("P", im.size, im.tobytes())
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    im.save(path)


def _segfolder(root: Path, n: int = 6, size: int = 12, palette: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = []
    for i in range(n):
        mask = rng.integers(0, 3, (size, size))
        mask[0, 0] = 255  # an ignored pixel
        img = np.stack([mask * 60] * 3, -1) % 256
        _png(root / "images" / f"im{i}.jpg", img)
        _png(root / "masks" / f"im{i}.png", mask, palette=palette)
        masks.append(mask)
    return masks


@pytest.mark.parametrize("palette", [False, True])
def test_segfolder_reads_index_and_palette_masks(tmp_path, palette):
    masks = _segfolder(tmp_path, palette=palette)
    with Image.open(tmp_path / "masks" / "im0.png") as im:
        assert im.mode == ("P" if palette else "L")
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    d = load_splits(f"segfolder:{tmp_path}", val_fraction=0.34)
    assert d.classes == ["sky", "road", "car"] and d.train.dense
    got = torch.cat([d.train.targets, d.val.targets])
    assert sorted(got.flatten().unique().tolist()) == [0, 1, 2, 255]
    assert {tuple(m.flatten().tolist()) for m in got} == {tuple(m.flatten().tolist()) for m in masks}


def test_segfolder_resizes_masks_by_nearest_neighbour(tmp_path):
    _segfolder(tmp_path, size=12)
    d = load_splits(f"segfolder:{tmp_path}", img_size=24, val_fraction=0.34)
    assert d.train.images.shape[-2:] == (24, 24) and d.train.targets.shape[-2:] == (24, 24)
    assert set(d.train.targets.unique().tolist()) <= {0, 1, 2, 255}  # no blended labels


def test_segfolder_errors_name_the_file(tmp_path):
    root = tmp_path / "a"
    _segfolder(root)
    _png(root / "masks" / "im2.png", np.zeros((10, 12)))
    with pytest.raises(VitkitError, match=r"mask '.*im2.png' is 12x10 but its image 'im2.jpg' is 12x12"):
        load_splits(f"segfolder:{root}")

    root = tmp_path / "b"
    _segfolder(root)
    (root / "classes.txt").write_text("sky\nroad\n")
    with pytest.raises(VitkitError, match=r"mask '.*' has label 2, outside the 2 classes"):
        load_splits(f"segfolder:{root}")

    root = tmp_path / "c"
    _segfolder(root)
    (root / "masks" / "im4.png").unlink()
    with pytest.raises(VitkitError, match=r"im4.jpg' has no mask in .* \(expected im4.png\)"):
        load_splits(f"segfolder:{root}")

    root = tmp_path / "d"
    _segfolder(root)
    _png(root / "masks" / "im1.png", np.zeros((12, 12, 3)))
    with pytest.raises(VitkitError, match=r"im1.png' is a RGB image; expected a single-channel index PNG"):
        load_splits(f"segfolder:{root}")

    with pytest.raises(VitkitError, match="expected images/ \\+ masks/"):
        load_splits(f"segfolder:{tmp_path}")


def _pairs(root: Path, n: int = 5, size: int = 10) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        a = rng.integers(0, 255, (size, size, 3))
        b = a.copy()
        b[:4, :4] = 255 - b[:4, :4]
        label = np.zeros((size, size))
        label[:4, :4] = 255
        _png(root / "A" / f"t{i}.png", a)
        _png(root / "B" / f"t{i}.png", b)
        _png(root / "label" / f"t{i}.png", label)


def test_pairs_stack_both_dates_and_binarise_labels(tmp_path):
    _pairs(tmp_path / "train")
    _pairs(tmp_path / "val", n=3)
    d = load_splits(f"pairs:{tmp_path}")
    assert d.description["validation"] == "official split"
    assert d.train.pair and d.train.images.shape == (5, 6, 10, 10) and len(d.val) == 3
    assert d.classes == ["unchanged", "changed"]
    assert d.train.targets[:, :4, :4].eq(1).all() and d.train.targets.sum() == 5 * 16
    # the second date's channels follow the first's
    assert torch.equal(d.train.images[:, 3:, :4, :4], 255 - d.train.images[:, :3, :4, :4])


def test_pairs_errors_name_the_file(tmp_path):
    _pairs(tmp_path / "x")
    (tmp_path / "x" / "B" / "t3.png").unlink()
    with pytest.raises(VitkitError, match=r"t3.png' has no B image in"):
        load_splits(f"pairs:{tmp_path / 'x'}")
    _pairs(tmp_path / "y")
    _png(tmp_path / "y" / "label" / "t0.png", np.full((10, 10), 7))
    with pytest.raises(VitkitError, match=r"change label '.*t0.png' has values \[7\]"):
        load_splits(f"pairs:{tmp_path / 'y'}")
    _pairs(tmp_path / "z")
    _png(tmp_path / "z" / "B" / "t1.png", np.zeros((8, 10, 3)))
    with pytest.raises(VitkitError, match=r"t1.png' is 10x8 but its A image is 10x10"):
        load_splits(f"pairs:{tmp_path / 'z'}")
