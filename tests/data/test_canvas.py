"""The canvas generator: deterministic, and every label it gives agrees with the pixels it paints."""

from __future__ import annotations

import pytest
import torch

from vitkit.data import load_splits
from vitkit.data.canvas import CanvasOptions, make_canvases, make_change_pairs
from vitkit.errors import VitkitError

OPTS = CanvasOptions(size=32, train=40, val=20)


def test_canvases_are_deterministic_and_splits_differ():
    a, b = make_canvases(12, OPTS), make_canvases(12, OPTS)
    assert torch.equal(a.images, b.images) and torch.equal(a.semantic, b.semantic)
    other = make_canvases(12, OPTS.model_copy(update={"seed": 1}))
    assert not torch.equal(a.images, other.images)
    val = make_canvases(12, OPTS, split="val")
    assert not torch.equal(a.images, val.images)


def test_instance_masks_boxes_and_semantic_mask_agree():
    c = make_canvases(30, OPTS)
    assert c.classes[0] == "background" and len(c.classes) == 11
    for i in range(30):
        inst, boxes, labels = c.instances[i], c.boxes[i], c.labels[i]
        assert len(inst) == len(boxes) == len(labels)
        # visible instance masks do not overlap, and painted by their labels they are the semantic mask
        assert len(inst) == 0 or int(inst.sum(0).max()) <= 1
        painted = torch.zeros_like(c.semantic[i])
        for m, lab in zip(inst, labels):
            painted[m] = lab
        fully_hidden = (c.semantic[i] != 0) & (painted == 0)  # specks under 4 px are no instance
        assert int(fully_hidden.sum()) < 4 * 5
        assert torch.equal(painted[painted != 0], c.semantic[i][painted != 0])
        # each box is the tight box of its mask
        for m, (x0, y0, x1, y1) in zip(inst, boxes.long().tolist()):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert (x0, y0, x1, y1) == (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    # items are brighter than the background, so the image carries the mask
    fg = c.semantic != 0
    assert c.images[:, 0][fg].float().mean() > c.images[:, 0][~fg].float().mean() + 60


def test_change_mask_is_where_the_semantic_label_differs():
    p = make_change_pairs(60, OPTS)
    assert torch.equal(p.change, (p.semantic_before != p.semantic_after).long())
    changed = p.change.flatten(1).any(1)
    assert 0.6 < changed.float().mean() < 1.0  # one pair in ten is unchanged, some events cancel out
    # unchanged pairs still differ in pixels (sensor noise, brightness): no change is not "equal images"
    same = ~changed
    assert same.any() and not torch.equal(p.before[same], p.after[same])


def test_canvas_uris_give_official_splits_and_one_line_errors():
    seg = load_splits("canvas:size=32,train=40,val=20")
    assert (len(seg.train), len(seg.val)) == (40, 20) and seg.train.dense and not seg.train.pair
    assert seg.train.images.shape == (40, 1, 32, 32) and seg.train.targets.shape == (40, 32, 32)
    assert seg.description["validation"] == "official split"
    pairs = load_splits("canvas-change:size=32,train=40,val=20")
    assert (
        pairs.train.pair
        and pairs.train.images.shape == (40, 2, 32, 32)
        and pairs.classes == ["unchanged", "changed"]
    )
    for uri, message in [
        ("canvas:size=8", "size"),
        ("canvas:sizes=32", "sizes"),
        ("canvas:min_items=4,max_items=2", "min_items 4 > max_items 2"),
        ("canvas:size", "not key=value"),
        ("canvas:source=cifar", "source"),
    ]:
        with pytest.raises(VitkitError, match=message) as e:
            load_splits(uri)
        assert "\n" not in str(e.value)


def test_dense_datasets_count_pixels_and_stratify_by_dominant_class():
    seg = load_splits("canvas:size=32,train=40,val=20")
    counts = seg.train.class_counts()
    assert sum(counts) == 40 * 32 * 32 and counts[0] == max(counts)
    dominant = seg.train.label_indices()
    assert dominant.shape == (40,) and int(dominant.min()) >= 0
    for i in range(5):
        fg = seg.train.targets[i][seg.train.targets[i] != 0]
        if len(fg):
            assert int(dominant[i]) == int(torch.bincount(fg).argmax())
