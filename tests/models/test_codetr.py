"""Co-DETR (models/codetr*.py): the ATSS assignment (the official mmdet ATSSAssigner's rules) on
hand-made boxes, the auxiliary losses against small re-implementations of the official ones, the
positive queries, and the model: gradients, inference equal to the plain DETR's."""

from __future__ import annotations

import pytest
import torch

from vitkit.models.codetr_atss import atss_anchors, atss_assign


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


# -- the ATSS head's losses --------------------------------------------------------------------------
def test_deltas_decode_as_torchvision_box_coder_with_mmdet_stds():
    from torchvision.models.detection._utils import BoxCoder

    from vitkit.models.codetr_atss import decode_deltas

    g = torch.Generator().manual_seed(1)
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 4.0, 40.0, 60.0], [-16.0, -16.0, 16.0, 16.0]])
    deltas = torch.randn(3, 4, generator=g) * 3  # large: the log-size clamp is exercised
    want = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(deltas, anchors)
    torch.testing.assert_close(decode_deltas(deltas, anchors), want, rtol=1e-5, atol=1e-4)


def test_centerness_target_is_one_at_the_box_centre_and_falls_off():
    from vitkit.models.codetr_atss import centerness_target

    box = torch.tensor([[0.0, 0.0, 20.0, 10.0]] * 2)
    anchors = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 4.0]])  # centres (10, 5), (5, 2)
    got = centerness_target(anchors, box)
    assert torch.allclose(got, torch.tensor([1.0, (5 / 15 * 2 / 8) ** 0.5]))


def _atss_reference(cls, reg, ctr, anchors, labels, gt, k, weight):
    """mmdet's ATSSHead.loss spelled out: focal over every anchor and class / sum over images of
    max(positives, 1); GIoU x
    centerness target / max(1, sum of targets); centerness BCE / the same count."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import generalized_box_iou

    p = cls.sigmoid()
    y = torch.nn.functional.one_hot(labels, k + 1)[..., :k].float()
    pt = p * y + (1 - p) * (1 - y)
    at = 0.25 * y + 0.75 * (1 - y)
    focal = -(at * (1 - pt) ** 2 * pt.clamp_min(1e-12).log()).sum()
    pos = labels < k
    n = float(sum(max(1, int(p.sum())) for p in pos))  # sum over images of max(positives, 1)
    a = anchors.expand(len(labels), -1, -1)[pos]
    box = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(reg[pos], a)
    centre = (a[:, :2] + a[:, 2:]) / 2
    g = gt[pos]
    lt, rb = centre - g[:, :2], g[:, 2:] - centre
    c_t = ((torch.minimum(lt, rb) / torch.maximum(lt, rb)).prod(-1)).sqrt()
    giou = 1 - torch.diag(generalized_box_iou(box, g))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(ctr[pos], c_t, reduction="sum")
    return {
        "atss_cls": focal / n * weight,
        "atss_bbox": (giou * c_t).sum() / max(1.0, float(c_t.sum())) * 2 * weight,
        "atss_centerness": bce / n * weight,
    }


def test_atss_losses_match_the_official_definition():
    from vitkit.models.codetr_atss import ATSSHead, atss_loss

    torch.manual_seed(0)
    k, strides = 3, [4, 8, 16]
    maps = [torch.randn(2, 32, 16 // s * 4, 16 // s * 4) for s in (4, 8, 16)]  # 16x16, 8x8, 4x4 at 64 px
    head = ATSSHead(32, k, 3)
    for m in head.modules():  # away from the init, so every term carries signal
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.1)
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 30.0, 40.0], [40.0, 4.0, 60.0, 20.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    losses, (anchors, labels, gt) = atss_loss(head, maps, strides, targets, weight=12.0)
    assert (labels[1] == k).all() and (labels[0] < k).sum() >= 2
    cls, reg, ctr = head(maps)
    want = _atss_reference(cls, reg, ctr, anchors, labels, gt, k, 12.0)
    for key in want:
        torch.testing.assert_close(losses[key], want[key], rtol=1e-4, atol=1e-5)


# -- positives -> decoder queries ---------------------------------------------------------------------
def test_aux_query_targets_keep_positives_first_and_pad_with_negatives():
    from vitkit.models.codetr import aux_query_targets

    k = 4
    a = torch.arange(30, dtype=torch.float32)
    coords = torch.stack([a, a, a + 8, a + 16], -1).expand(2, -1, -1)  # (2, 30, 4) xyxy px
    labels = torch.full((2, 30), k)
    labels[0, [3, 7, 11]] = torch.tensor([0, 1, 2])  # image 0: three positives; image 1: none
    boxes = coords + 1
    feats = torch.arange(30, dtype=torch.float32)[None, :, None].expand(2, -1, 5)
    g = torch.Generator().manual_seed(0)
    coord, lab, target, positive, feat = aux_query_targets(coords, labels, boxes, feats, k, (32, 64), g)
    assert coord.shape == (2, 9, 4) and feat.shape == (2, 9, 5)  # N = max(9, 3)
    assert positive[0].tolist() == [True] * 3 + [False] * 6 and not positive[1].any()
    assert lab[0, :3].tolist() == [0, 1, 2] and (lab[:, 3:] == k).all() and (lab[1] == k).all()
    assert feat[0, :3, 0].tolist() == [3.0, 7.0, 11.0]
    # cx, cy, w, h of the anchor (not of a prediction) over the image's width and height
    torch.testing.assert_close(
        coord[0, 0], torch.tensor([(3 + 11) / 2 / 64, (3 + 19) / 2 / 32, 8 / 64, 16 / 32])
    )
    torch.testing.assert_close(
        target[0, 0], torch.tensor([(4 + 12) / 2 / 64, (4 + 20) / 2 / 32, 8 / 64, 16 / 32])
    )
    padded = feat[0, 3:, 0].long().tolist()
    assert all(labels[0, i] == k for i in padded) and len(set(padded)) == 6  # real negatives, each once
    assert len(set(feat[1, :, 0].tolist())) == 9


def test_aux_query_targets_subsample_when_an_image_has_too_many_positives(monkeypatch):
    import vitkit.models.codetr as codetr

    monkeypatch.setattr(codetr, "MAX_POS_QUERIES", 12)
    labels = torch.zeros(1, 40, dtype=torch.long)
    labels[0, 30:] = 1  # 30 positives (class 0), 10 negatives (k = 1)
    x = torch.rand(1, 40, 4) * 10
    coords = torch.cat([x[..., :2], x[..., :2] + 5], -1)
    _, lab, _, positive, _ = codetr.aux_query_targets(coords, labels, coords, x, 1, (32, 32))
    assert lab.shape == (1, 12) and positive.all()


def _query_loss_reference(logits, boxes, labels, target, positive):
    """loss_single_aux (official): focal / positives x 2, L1 on cx, cy, w, h / positives x 5, GIoU / positives x 2."""
    from torchvision.ops import box_convert, generalized_box_iou

    k = logits.shape[-1]
    n = max(1.0, float(positive.sum()))
    p = logits.sigmoid()
    y = torch.nn.functional.one_hot(labels, k + 1)[..., :k].float()
    pt = p * y + (1 - p) * (1 - y)
    focal = -((0.25 * y + 0.75 * (1 - y)) * (1 - pt) ** 2 * pt.log()).sum()
    b, t = boxes[positive], target[positive]
    giou = 1 - torch.diag(
        generalized_box_iou(box_convert(b, "cxcywh", "xyxy"), box_convert(t, "cxcywh", "xyxy"))
    )
    return {"cls": 2 * focal / n, "bbox": 5 * (b - t).abs().sum() / n, "iou": 2 * giou.sum() / n}


def test_aux_query_loss_matches_the_official_definition():
    from vitkit.models.codetr import aux_query_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 9, 3)
    boxes = torch.rand(2, 9, 4) * 0.3 + torch.tensor([0.3, 0.3, 0.1, 0.1])
    target = torch.rand(2, 9, 4) * 0.3 + torch.tensor([0.3, 0.3, 0.1, 0.1])
    labels = torch.tensor([[0, 2, 1] + [3] * 6, [1] + [3] * 8])
    positive = labels < 3
    got, want = (
        aux_query_loss(logits, boxes, labels, target, positive),
        _query_loss_reference(logits, boxes, labels, target, positive),
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


# -- the model ----------------------------------------------------------------------------------------
def _codetr(co_heads=("atss", "rcnn"), seed=0):
    from vitkit.models import create_model
    from vitkit.models.dense import default_head_config
    from vitkit.models.heads import attach_head

    torch.manual_seed(seed)
    vit = create_model("vitkit_micro_p4_16", num_classes=3, img_size=32)
    head = "co-detr" if co_heads else "deformable-detr"
    cfg = default_head_config(
        vit, 3, task="detection", head=head, **({"co_heads": co_heads} if co_heads else {})
    )
    return attach_head(vit, cfg)


TARGETS = [
    {
        "boxes": torch.tensor([[4.0, 6.0, 16.0, 20.0], [18.0, 2.0, 30.0, 12.0]]),
        "labels": torch.tensor([0, 2]),
    },
    {"boxes": torch.tensor([[8.0, 8.0, 24.0, 28.0]]), "labels": torch.tensor([1])},
]


def test_codetr_trains_every_head_and_its_query_group_into_the_encoder():
    model = _codetr().train()
    x = torch.randn(2, 3, 32, 32)
    losses = model(x, TARGETS)
    assert set(losses) == {
        "detr", "atss_cls", "atss_bbox", "atss_centerness", "rpn_cls", "rpn_bbox", "rcnn_cls", "rcnn_bbox",
        *(f"{h}_query_{k}" for h in ("atss", "rcnn") for k in ("cls", "bbox", "iou")),
    }  # fmt: skip
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    # a query group's loss alone reaches the ViT (through the not-detached encoder memory), the shared
    # class and box heads and its own head embedding row: the official Embedding(K, 1, 1, 256) bug
    # (a frozen zero row for the second head) is not copied
    model.zero_grad()
    (losses["rcnn_query_cls"] + losses["rcnn_query_bbox"]).backward(retain_graph=True)
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.detr.class_embed[0].weight.grad.abs().sum() > 0
    assert (
        model.head_pos_embed.weight.grad[1].abs().sum() > 0
        and model.aux_feat_trans[1].weight.grad is not None
    )
    model.zero_grad()
    losses["atss_query_bbox"].backward()
    assert (
        model.head_pos_embed.weight.grad[0].abs().sum() > 0
        and model.head_pos_embed.weight.grad[1].abs().sum() == 0
    )


def test_codetr_without_boxes_still_gives_finite_losses():
    model = _codetr(("atss",)).train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(torch.randn(2, 3, 32, 32), empty)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["atss_query_bbox"].item() == 0.0
    sum(losses.values()).backward()


def test_codetr_predicts_exactly_as_the_detr_it_trains():
    """Inference is the DETR's alone: the same weights in a plain Deformable DETR give the same detections."""
    co, plain = _codetr().eval(), _codetr(co_heads=None, seed=1).eval()
    missing, unexpected = plain.load_state_dict(co.state_dict(), strict=False)
    assert not missing and unexpected and all(
        k.split(".")[0] in ("downsample", "atss", "rcnn", "aux_pos_trans", "aux_pos_norm", "aux_feat_trans",
                            "aux_feat_norm", "head_pos_embed") for k in unexpected
    )  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(co.raw(x), plain.raw(x))
        a, b = co(x), plain(x)
    assert all(torch.equal(p["boxes"], q["boxes"]) for p, q in zip(a, b))


def test_co_heads_belong_to_co_detr_only():
    from vitkit.errors import VitkitError
    from vitkit.models.dense import validated_head_config

    base = dict(
        task="detection", num_classes=3, channels=64, indices=[3], in_chans=3, scales=[1.0, 0.5], queries=50
    )
    with pytest.raises(VitkitError, match="co_heads"):
        validated_head_config({**base, "head": "deformable-detr", "co_heads": ["atss"]}, "head")
    with pytest.raises(VitkitError, match="co_heads"):
        validated_head_config({**base, "head": "co-detr"}, "head")
    with pytest.raises(VitkitError, match="co_heads"):
        validated_head_config({**base, "head": "co-detr", "co_heads": ["atss", "atss"]}, "head")
    assert validated_head_config({**base, "head": "co-detr", "co_heads": ["rcnn"]}, "head").co_heads == [
        "rcnn"
    ]


def test_rcnn_positives_come_first_and_stay_float32_under_bf16_autocast():
    """The sampled RoIs are cut to the fewest per image after each image's positives are put first
    (only negatives are cut, as mmdet's order guarantees), and the branch runs in float32 (the
    official force_fp32): bf16 would round the boxes it matches and turns into queries."""
    from vitkit.models.codetr_rcnn import RCNNHead

    torch.manual_seed(0)
    head = RCNNHead(32, 3, [4, 8, 16, 32])
    maps = [torch.randn(2, 32, 32 // s, 32 // s) for s in (4, 8, 16, 32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, (rois, labels, gt, feats) = head(maps, (32, 32), TARGETS, weight=4.0)
    assert rois.dtype == gt.dtype == feats.dtype == torch.float32
    assert all(torch.isfinite(v) for v in losses.values())
    for row in labels:
        pos = (row < 3).int()
        assert pos.sum() > 0 and torch.equal(pos, pos.sort(descending=True).values)  # 1s, then 0s
