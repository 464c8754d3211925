"""Dataset URIs, splits, long-tail profile, multi-label builders, batch transforms, bad input."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import (
    AugmentConfig,
    BatchTransform,
    VitkitDataWarning,
    load_eval_data,
    load_source,
    load_splits,
    longtail_counts,
)
from vitkit.data.sources import FASHION_MNIST_ROOT
from vitkit.errors import VitkitError


def test_digits_split_is_stratified_deterministic_and_disjoint(digits):
    assert len(digits.train) + len(digits.val) == 1797
    assert len(digits.val) >= 300
    assert digits.train.images.dtype == torch.uint8 and digits.train.image_shape == (1, 8, 8)
    assert min(digits.val.class_counts()) >= 34
    again = load_splits("digits")
    assert torch.equal(again.val.images, digits.val.images)
    other = load_splits("digits", seed=1)
    assert not torch.equal(other.val.images, digits.val.images)
    # No image of the validation split is also in the training split (rows compared as bytes).
    train_rows = {bytes(r) for r in digits.train.images.flatten(1).numpy()}
    dup_in_source = (
        len(digits.train)
        + len(digits.val)
        - len({bytes(r) for r in torch.cat([digits.train.images, digits.val.images]).flatten(1).numpy()})
    )
    leaked = sum(bytes(r) in train_rows for r in digits.val.images.flatten(1).numpy())
    assert leaked <= dup_in_source


def test_longtail_profile_matches_cifar_lt_formula():
    counts = longtail_counts([6000] * 10, 100)
    assert counts == [int(6000 * 100 ** (-r / 9)) for r in range(10)]
    assert counts[0] == 6000 and counts[-1] == 60
    s = load_splits("digits", longtail=10)
    got = s.train.class_counts()
    assert got[0] == max(got) and got[-1] == int(max(load_splits("digits").train.class_counts()) / 10)
    assert s.val.class_counts() == load_splits("digits").val.class_counts()  # validation stays balanced


def _fashion_available() -> bool:
    return os.path.isfile(os.path.join(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz"))


@pytest.mark.skipif(
    not _fashion_available() and not os.environ.get("VITKIT_REQUIRE_FASHION_MNIST"),
    reason="apt-get install dataset-fashion-mnist (CI installs it)",
)
def test_fashion_mnist_official_splits_and_longtail():
    src = load_source("fashion-mnist")
    assert len(src["train"]) == 60000 and len(src["test"]) == 10000
    assert src["train"].class_counts() == [6000] * 10
    lt = load_splits("fashion-mnist", longtail=100)
    assert len(lt.train) == 14886 and lt.train.class_counts()[-1] == 60
    assert len(lt.val) == 10000


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_FASHION_MNIST_ROOT", str(tmp_path))
    with pytest.raises(VitkitError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist")


def _write_folder(root, digits, n_per_class=6, classes=(0, 1, 2)):
    for c in classes:
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        idx = torch.nonzero(digits.train.targets == c).flatten()[:n_per_class]
        for j, i in enumerate(idx):
            Image.fromarray(digits.train.images[i, 0].numpy()).save(d / f"{j}.png")
    return root


def test_folder_loads_resizes_and_splits(tmp_path, digits):
    root = _write_folder(tmp_path / "imgs", digits)
    data = load_source(f"folder:{root}", img_size=16)["all"]
    assert len(data) == 18 and data.classes == ["class_0", "class_1", "class_2"]
    assert data.image_shape == (1, 16, 16)
    s = load_splits(f"folder:{root}", img_size=16, val_fraction=0.34)
    assert len(s.val) == 6 and len(s.train) == 12


def test_folder_with_train_val_subfolders(tmp_path, digits):
    _write_folder(tmp_path / "ds" / "train", digits)
    _write_folder(tmp_path / "ds" / "val", digits, n_per_class=2)
    s = load_splits(f"folder:{tmp_path / 'ds'}", img_size=8)
    assert len(s.train) == 18 and len(s.val) == 6 and s.description["validation"] == "official split"


def test_folder_bad_input(tmp_path, digits):
    with pytest.raises(VitkitError, match="does not exist"):
        load_source(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitkitError, match="no class sub-folders"):
        load_source(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(VitkitError, match="no image files"):
        load_source(f"folder:{tmp_path / 'noimg'}")


def test_corrupt_images_skipped_with_count_or_strict_fails(tmp_path, digits):
    root = _write_folder(tmp_path / "imgs", digits)
    (root / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = root / "class_2" / "0.png"
    good.write_bytes(good.read_bytes()[:40])  # truncated
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        data = load_source(f"folder:{root}", img_size=8)["all"]
    assert len(data) == 17
    assert any(issubclass(x.category, VitkitDataWarning) and "skipped 2" in str(x.message) for x in w)
    with pytest.raises(VitkitError, match=r"cannot read image '.*(broken|0)\.png'"):
        load_source(f"folder:{root}", img_size=8, strict=True)


def test_csv_single_and_multilabel_and_bad_input(tmp_path, digits):
    _write_folder(tmp_path / "imgs", digits, n_per_class=2)
    rows = ["path,label", "imgs/class_0/0.png,zero", "imgs/class_1/0.png,one", "imgs/class_2/1.png,zero|one"]
    (tmp_path / "ml.csv").write_text("\n".join(rows) + "\n")
    ml = load_source(f"csv:{tmp_path / 'ml.csv'}", img_size=8)["all"]
    assert ml.multilabel and ml.classes == ["one", "zero"]
    assert ml.targets.tolist() == [[0, 1], [1, 0], [1, 1]]
    (tmp_path / "sl.csv").write_text("\n".join(rows[:3]) + "\n")
    sl = load_source(f"csv:{tmp_path / 'sl.csv'}", img_size=8)["all"]
    assert not sl.multilabel and sl.targets.tolist() == [1, 0]
    (tmp_path / "onehot.csv").write_text("file,cat,dog\nimgs/class_0/0.png,1,0\nimgs/class_1/0.png,1,1\n")
    oh = load_source(f"csv:{tmp_path / 'onehot.csv'}", img_size=8)["all"]
    assert oh.classes == ["cat", "dog"] and oh.targets.tolist() == [[1, 0], [1, 1]]

    (tmp_path / "nocol.csv").write_text("image_file,label\nx.png,a\n")
    with pytest.raises(VitkitError, match="no image path column"):
        load_source(f"csv:{tmp_path / 'nocol.csv'}")
    (tmp_path / "nolabel.csv").write_text("path\nimgs/class_0/0.png\n")
    with pytest.raises(VitkitError, match="no label column"):
        load_source(f"csv:{tmp_path / 'nolabel.csv'}")
    (tmp_path / "missing.csv").write_text("path,label\nimgs/class_0/0.png,a\nimgs/nope.png,b\n")
    with pytest.raises(VitkitError, match=r"line 3: image .*nope\.png' not found"):
        load_source(f"csv:{tmp_path / 'missing.csv'}")


def test_npz_layouts_and_bad_input(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (20, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", x=x, y=np.arange(20) % 4, classes=np.array(["a", "b", "c", "d"]))
    d = load_source(f"npz:{tmp_path / 'ok.npz'}")["all"]
    assert d.image_shape == (3, 12, 12) and d.classes == ["a", "b", "c", "d"]
    assert torch.equal(d.images[0], torch.from_numpy(x[0]).permute(2, 0, 1))
    np.savez(tmp_path / "float.npz", x=np.full((4, 8, 8), 0.5), y=np.zeros((4, 3)))
    f = load_source(f"npz:{tmp_path / 'float.npz'}")["all"]
    assert f.multilabel and int(f.images.max()) == 128
    np.savez(tmp_path / "noy.npz", x=x)
    with pytest.raises(VitkitError, match="missing array 'y'"):
        load_source(f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "range.npz", x=np.full((4, 8, 8), 3.0), y=np.zeros(4, int))
    with pytest.raises(VitkitError, match="uint8 or floats in"):
        load_source(f"npz:{tmp_path / 'range.npz'}")
    # Object arrays would need unpickling: refused.
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 2, dtype=object), y=np.zeros(2, int))
    with pytest.raises(VitkitError):
        load_source(f"npz:{tmp_path / 'obj.npz'}")


def test_unknown_uri_has_hint(tmp_path):
    with pytest.raises(VitkitError, match="folder:"):
        load_source(str(tmp_path))
    with pytest.raises(VitkitError, match="unknown dataset 'cifar'"):
        load_source("cifar")


def test_mosaic_builds_multilabel_from_each_split_separately():
    s = load_splits("mosaic:digits")
    assert s.multilabel and s.train.image_shape == (1, 16, 16)
    k = s.train.targets.sum(1)
    assert k.min() >= 1 and k.max() <= 4 and 3.0 < k.mean() < 3.8  # 4 draws of 10 classes: 3.44 expected
    assert len(s.val) == len(load_splits("digits").val)


def test_eval_transform_resizes_expands_and_normalizes(digits):
    tf = BatchTransform(16, 3, (0.5,) * 3, (0.5,) * 3, train=False)
    x = tf.images(digits.val.images[:4])
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1])  # gray replicated to RGB
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    assert torch.equal(tf.images(digits.val.images[:4]), x)  # deterministic


def test_train_transform_augments_reproducibly_and_mixes_targets(digits):
    aug = AugmentConfig(scale=(0.6, 1.0), translate=0.1, hflip=0.5, mixup=0.8, cutmix=1.0)
    tf = BatchTransform(16, 3, (0.5,) * 3, (0.5,) * 3, train=True, augment=aug, num_classes=10)
    imgs, y = digits.train.images[:8], digits.train.targets[:8]
    np.random.seed(0)
    a, ya = tf(imgs, y, torch.Generator().manual_seed(1))
    np.random.seed(0)
    b, _ = tf(imgs, y, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert ya.shape == (8, 10) and torch.allclose(ya.sum(1), torch.ones(8))
    plain = BatchTransform(16, 3, (0.5,) * 3, (0.5,) * 3).images(imgs)
    assert (a - plain).abs().mean() > 0.05


def test_randaug_string_validated(digits):
    with pytest.raises(VitkitError, match="RandAugment"):
        BatchTransform(16, 3, (0.5,) * 3, (0.5,) * 3, train=True, augment=AugmentConfig(randaug="rand-zz"))
    tf = BatchTransform(
        16, 3, (0.5,) * 3, (0.5,) * 3, train=True, augment=AugmentConfig(randaug="rand-m9-mstd0.5")
    )
    assert tf(digits.train.images[:4], digits.train.targets[:4])[0].shape == (4, 3, 16, 16)


def test_load_eval_data_prefers_test_split(tmp_path):
    x = np.zeros((6, 8, 8), np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(6) % 2)
    assert len(load_eval_data(f"npz:{tmp_path / 'a.npz'}")) == 6


def _data_warnings(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w if issubclass(x.category, VitkitDataWarning)]


def test_small_training_split_warns_and_empty_splits_fail(tmp_path, digits):
    # the default hold-out and a deliberate --train-size do not warn
    assert _data_warnings(lambda: load_splits("digits"))[1] == []
    assert _data_warnings(lambda: load_splits("digits", train_size=100))[1] == []
    s, w = _data_warnings(lambda: load_splits("digits", val_fraction=0.999))
    assert len(s.train) == 10 and len(w) == 1
    assert "only 10 images for 10 classes, fewer than the 1787 held out by val_fraction 0.999" in w[0]
    # more held out than trained on, though every class keeps plenty
    s, w = _data_warnings(lambda: load_splits("digits", val_fraction=0.6))
    assert len(w) == 1 and f"fewer than the {len(s.val)} held out" in w[0]
    # fewer than 2 training images per class, from a size limit the user asked for
    assert (
        "only 10 images for 10 classes" in _data_warnings(lambda: load_splits("digits", train_size=10))[1][0]
    )
    x = np.zeros((3, 8, 8), np.uint8)
    np.savez(tmp_path / "singletons.npz", x=x, y=np.arange(3))
    with pytest.raises(VitkitError, match=r"val_fraction 0\.2 leaves no validation images"):
        load_splits(f"npz:{tmp_path / 'singletons.npz'}")


def test_training_needs_two_classes(tmp_path, digits):
    x = np.zeros((6, 8, 8), np.uint8)
    np.savez(tmp_path / "one.npz", x=x, y=np.zeros(6, int), classes=np.array(["cat", "dog"]))
    with pytest.raises(VitkitError, match=r"all 6 images are of one class \('cat'\).*at least 2 classes"):
        load_splits(f"npz:{tmp_path / 'one.npz'}")
    # evaluation data may hold one class
    assert len(load_eval_data(f"npz:{tmp_path / 'one.npz'}")) == 6
    np.savez(tmp_path / "allpos.npz", x=x, y=np.ones((6, 3)))
    with pytest.raises(VitkitError, match="no class is present in some images and absent in others"):
        load_splits(f"npz:{tmp_path / 'allpos.npz'}")
    y = np.ones((6, 3))
    y[0, 2] = 0  # one class varies: learnable
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    with pytest.warns(VitkitDataWarning, match="only 5 images for 3 classes"):  # learnable, but tiny
        assert load_splits(f"npz:{tmp_path / 'ok.npz'}").multilabel
    _write_folder(tmp_path / "f", digits, n_per_class=3, classes=(4,))
    with pytest.raises(VitkitError, match=r"all 3 images are of one class \('class_4'\)"):
        load_splits(f"folder:{tmp_path / 'f'}", img_size=8)


def test_csv_utf8_bom_line_numbers_and_cells(tmp_path, digits):
    _write_folder(tmp_path / "imgs", digits, n_per_class=2)
    # a spreadsheet's byte-order mark does not hide the 'path' column
    bom = "path,label\nimgs/class_0/0.png,a\nimgs/class_1/0.png,b\n".encode("utf-8-sig")
    (tmp_path / "bom.csv").write_bytes(bom)
    assert load_source(f"csv:{tmp_path / 'bom.csv'}", img_size=8)["all"].classes == ["a", "b"]
    # line numbers count physical lines (a quoted label spans two)
    (tmp_path / "q.csv").write_text('path,label\nimgs/class_0/0.png,"a\nb"\nimgs/nope.png,b\n')
    with pytest.raises(VitkitError, match=r"q\.csv line 4: image .*nope\.png' not found"):
        load_source(f"csv:{tmp_path / 'q.csv'}")
    (tmp_path / "cp1252.csv").write_bytes("path,label\r\nimgs/class_0/0.png,\x93a\x94\r\n".encode("latin-1"))
    with pytest.raises(
        VitkitError, match=r"line 2: not UTF-8 text \(byte 0x93 at offset 31\); save the CSV as UTF-8"
    ):
        load_source(f"csv:{tmp_path / 'cp1252.csv'}")
    # a line break inside a cell is shown escaped: the message stays one line
    (tmp_path / "vt.csv").write_text("path,cat,dog\nimgs/class_0/0.png,1,1\u20280\n")
    with pytest.raises(VitkitError, match=r"column 'dog' holds '1\\u20280'") as e:
        load_source(f"csv:{tmp_path / 'vt.csv'}")
    assert len(str(e.value).splitlines()) == 1


def test_npz_names_labels_and_values(tmp_path):
    x = np.zeros((4, 8, 8), np.uint8)
    # names may list classes that this file has no image of (e.g. a small evaluation set)
    np.savez(tmp_path / "names.npz", x=x, y=np.array([0, 1, 0, 1]), classes=np.array(["a", "b", "c"]))
    assert load_source(f"npz:{tmp_path / 'names.npz'}")["all"].classes == ["a", "b", "c"]
    np.savez(tmp_path / "bytes.npz", x=x, y=np.array([0, 1, 0, 1]), classes=np.array([b"a", b"b"]))
    assert load_source(f"npz:{tmp_path / 'bytes.npz'}")["all"].classes == ["a", "b"]
    np.savez(
        tmp_path / "nanrow.npz", x=np.full((4, 8, 8), 0.5), y=np.array([[0, 1], [1, 0], [0, 1], [1, -1]])
    )
    with pytest.raises(
        VitkitError, match=r"'y' is multi-hot .* found -1 at row 3, column 1 \(1 such values\)"
    ):
        load_source(f"npz:{tmp_path / 'nanrow.npz'}")
    f16 = np.full((4, 8, 8), 1.0, np.float16)
    np.savez(tmp_path / "f16.npz", x=f16, y=np.array([0, 1, 0, 1]))
    assert int(load_source(f"npz:{tmp_path / 'f16.npz'}")["all"].images.max()) == 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the NaN cast warning of numpy is gone: it is an error now
        f16[1, 2, 3] = np.nan
        np.savez(tmp_path / "f16.npz", x=f16, y=np.array([0, 1, 0, 1]))
        with pytest.raises(VitkitError, match=r"'x' holds 1 NaN/inf value\(s\), the first in image 1"):
            load_source(f"npz:{tmp_path / 'f16.npz'}")
