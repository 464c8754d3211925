"""Co-DETR's ATSS assignment (the official mmdet ATSSAssigner's rules) on hand-made boxes."""

from __future__ import annotations

import torch

from vitkit.models.codetr import atss_anchors, atss_assign


def test_anchors_are_level_major_row_major_at_offset_zero():
    a = atss_anchors([(2, 3), (1, 2)], [4, 8])
    assert a.shape == (8, 4)
    centres = (a[:, :2] + a[:, 2:]) / 2
    assert centres[:6].tolist() == [
        [0, 0],
        [4, 0],
        [8, 0],
        [0, 4],
        [4, 4],
        [8, 4],
    ]  # (x, y), not cell centres
    assert centres[6:].tolist() == [[0, 0], [8, 0]]
    assert (a[:6, 2] - a[:6, 0]).eq(32).all() and (a[6:, 2] - a[6:, 0]).eq(64).all()  # side 8 x stride


def _reference(anchors, counts, gt, topk=9):
    """The rule spelled out box by box (a slower second reading of the official assigner)."""
    from torchvision.ops import box_iou

    iou = box_iou(anchors, gt)
    ac = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = {}
    for j, box in enumerate(gt):
        centre = (box[:2] + box[2:]) / 2
        cands, start = [], 0
        for n in counts:
            d = ((ac[start : start + n] - centre) ** 2).sum(1).sqrt()
            cands += (d.argsort()[: min(topk, n)] + start).tolist()
            start += n
        vals = iou[cands, j]
        thr = vals.mean() + vals.std()
        for i in cands:
            x, y = ac[i].tolist()
            inside = min(x - box[0], y - box[1], box[2] - x, box[3] - y) > 0.01
            if iou[i, j] >= thr and inside and float(iou[i, j]) > best.get(i, (-1.0, -1))[0]:
                best[i] = (float(iou[i, j]), j)
    return {i: j for i, (_, j) in best.items()}


def test_assignment_matches_the_rule_spelled_out():
    g = torch.Generator().manual_seed(0)
    shapes, strides = [(8, 8), (4, 4), (2, 2)], [4, 8, 16]
    anchors = atss_anchors(shapes, strides)
    counts = [h * w for h, w in shapes]
    for _ in range(5):
        xy = torch.rand(4, 2, generator=g) * 20
        wh = 4 + torch.rand(4, 2, generator=g) * 12
        gt = torch.cat([xy, xy + wh], 1)
        labels_in = torch.tensor([0, 1, 2, 1])
        labels, index = atss_assign(anchors, counts, gt, labels_in, num_classes=3)
        want = _reference(anchors, counts, gt)
        got = {i: int(index[i]) for i in torch.nonzero(index >= 0).flatten().tolist()}
        assert got == want and len(got) > 0
        assert all(int(labels[i]) == int(labels_in[j]) for i, j in got.items())
        assert (labels[index < 0] == 3).all()


def test_no_boxes_means_every_anchor_is_background():
    anchors = atss_anchors([(4, 4)], [8])
    labels, index = atss_assign(
        anchors, [16], torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), num_classes=5
    )
    assert (labels == 5).all() and (index == -1).all()


def test_an_anchor_wanted_by_two_boxes_goes_to_the_one_it_overlaps_most():
    from torchvision.ops import box_iou

    anchors = atss_anchors([(4, 4)], [8])  # 64 px anchors centred on a 0/8/16/24 grid
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0], [6.0, 6.0, 30.0, 30.0]])
    _, index = atss_assign(anchors, [16], gt, torch.tensor([0, 1]), num_classes=2, topk=4)
    # each box alone: which anchors it would take; their overlap is where the tie rule decides
    alone = [set(_reference(anchors, [16], gt[j : j + 1], topk=4)) for j in range(2)]
    shared = alone[0] & alone[1]
    assert shared, "the boxes must compete for some anchor, or this test tests nothing"
    iou = box_iou(anchors, gt)
    for i in shared:
        assert int(index[i]) == int(iou[i].argmax())
