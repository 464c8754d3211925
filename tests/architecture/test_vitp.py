"""ViT-P: point tokens and fusion against the official logic, point sampling, stage-1 regions and
proposals, the two-stage semantic inference, and a point classifier that learns on canvases."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vitkit.architecture.vitp import (
    IGNORE_INDEX,
    MaskPooledClassifier,
    PointObjective,
    PointViT,
    classify_points,
    connected_regions,
    fuse_class_logits,
    mask_argmax_points,
    perturbed_proposals,
    sample_points,
    semantic_inference,
    signed_depth,
)
from vitkit.errors import VitkitError
from vitkit.models import create_model

_spec = importlib.util.spec_from_file_location(
    "vitp_reference", Path(__file__).with_name("vitp_reference.py")
)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def _point_vit(num_classes: int = 4, **kw) -> PointViT:
    torch.manual_seed(0)
    return PointViT(create_model("vitkit_micro_p4_16", num_classes=num_classes, **kw)).eval()


def test_point_tokens_match_the_official_token_preparation():
    model = _point_vit()
    with torch.no_grad():
        model.vit.pos_embed.normal_(std=0.5)  # a class position embedding that matters
    images = torch.randn(2, 3, 16, 16)
    points = torch.rand(2, 5, 2) * 2 - 1
    got = model(images, points)
    want = reference.official_point_logits(model.vit, model.point_embed.weight, images, points)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.shape == (2, 5, 4)
    # the official init (std 1e-6) is overwritten by timm's trunc-normal 0.02 on every Linear
    assert 0.01 < float(model.point_embed.weight.detach().std()) < 0.03
    # the location comes only through the point embedding: another point, other logits
    moved = points.clone()
    moved[0, 0] = -moved[0, 0]
    assert not torch.allclose(model(images, moved)[0, 0], got[0, 0])


@pytest.mark.parametrize(
    "kwargs,message",
    [({"reg_tokens": 2}, "register tokens"), ({"class_token": False, "global_pool": "avg"}, "class token")],
)
def test_vits_without_a_plain_class_token_are_refused(kwargs, message):
    with pytest.raises(VitkitError, match=message):
        PointViT(create_model("vitkit_micro_p4_16", num_classes=3, **kwargs))


def test_an_image_of_another_size_is_a_one_line_error():
    model = _point_vit()
    with pytest.raises(
        VitkitError, match=r"a 32x32 image gives 64 patches; the ViT's position embedding holds 16"
    ):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 2, 2))


def test_sampled_points_are_row_col_of_a_pixel_of_their_label():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 12, 20, dtype=torch.long)
    masks[:, 2:5, 14:19] = 2  # a small class in the top right
    masks[:, 8:, :3] = IGNORE_INDEX
    masks[2] = IGNORE_INDEX  # nothing to sample: points are ignored
    points, labels = sample_points(masks, 400, g)
    assert points.shape == (3, 400, 2) and labels.shape == (3, 400)
    assert torch.all(labels[2] == IGNORE_INDEX)
    rows = ((points[:2, :, 0] + 1) / 2 * 12).round().long()
    cols = ((points[:2, :, 1] + 1) / 2 * 20).round().long()
    for i in range(2):
        assert torch.equal(masks[i, rows[i], cols[i]], labels[i])  # (row, col), label under the point
    assert set(labels[:2].unique().tolist()) == {0, 2}  # never the ignore index
    # classes drawn uniformly, not pixels: the 15-pixel class gets about half of the points
    assert 0.4 < float((labels[:2] == 2).float().mean()) < 0.6


def test_fusion_and_semantic_inference_match_the_official_lines():
    g = torch.Generator().manual_seed(1)
    in_logits, out_logits = torch.randn(7, 5, generator=g), torch.randn(7, 4, generator=g)
    for alpha in (0.0, 0.4, 1.0):
        got = fuse_class_logits(in_logits, out_logits, alpha)
        torch.testing.assert_close(
            got, reference.official_fusion(in_logits, out_logits, alpha), rtol=0, atol=1e-6
        )
    void = in_logits.softmax(-1)[:, -1:]
    ends = {0.0: in_logits[:, :-1], 1.0: out_logits}
    for alpha, logits in ends.items():  # the ends are stage 1 alone and ViT-P alone, void from stage 1
        probs = fuse_class_logits(in_logits, out_logits, alpha).exp()
        torch.testing.assert_close(probs[:, :-1], logits.softmax(-1) * (1 - void), rtol=0, atol=1e-6)
    masks = torch.randn(7, 6, 9, generator=g)
    fused = fuse_class_logits(in_logits, out_logits, 0.4)
    torch.testing.assert_close(
        semantic_inference(fused, masks),
        reference.official_semantic_inference(fused, masks),
        rtol=0,
        atol=1e-6,
    )


def test_fusion_stays_finite_where_the_official_product_underflows():
    in_logits, out_logits = torch.tensor([[300.0, 0.0, 0.0, -300.0]]), torch.tensor([[0.0, 300.0, 0.0]])
    assert torch.isnan(
        reference.official_fusion(in_logits, out_logits, 0.4).exp()
    ).any()  # 0 * 0, log, softmax
    probs = fuse_class_logits(in_logits, out_logits, 0.4).exp()
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5


def test_the_replaced_class_token_is_frozen_and_decay_exemptions_follow_the_vit():
    model = _point_vit()
    assert not model.vit.cls_token.requires_grad  # unused: DDP refuses parameters without gradients
    assert {"vit.pos_embed", "vit.cls_token"} <= model.no_weight_decay()


def test_regions_are_eight_connected_components_per_class():
    m = torch.zeros(8, 8, dtype=torch.long)
    m[1:3, 1:3] = 1
    m[3, 3] = 1  # touches the first blob diagonally: the same region
    m[6:, 6:] = 1  # a second region of class 1
    m[0, 7] = IGNORE_INDEX
    regions, labels = connected_regions(m)
    assert sorted(labels.tolist()) == [0, 1, 1]
    ones = regions[labels == 1]
    assert sorted(int(r.sum()) for r in ones) == [4, 5]
    assert not regions.any(0)[0, 7]  # ignored pixels belong to no region
    assert torch.equal(regions.sum(0)[m != IGNORE_INDEX], torch.ones(63, dtype=torch.long))


def test_the_point_of_a_proposal_is_its_innermost_pixel():
    masks = torch.zeros(2, 9, 9, dtype=torch.bool)
    masks[0, 2:7, 2:7] = True  # 5x5: centre (4, 4)
    masks[1, 0:3, 0:3] = True  # 3x3 in the corner: the image border counts as outside, centre (1, 1)
    points = mask_argmax_points(signed_depth(masks))
    torch.testing.assert_close(points, 2 * torch.tensor([[4 / 9, 4 / 9], [1 / 9, 1 / 9]]) - 1)
    depth = signed_depth(masks)
    assert depth[0, 4, 4] == 3 and depth[0, 2, 3] == 1 and depth[0, 0, 0] == -2  # chessboard distances
    assert depth[1, 0, 0] == 1 and depth[1, 1, 1] == 2


def test_chunks_pad_with_random_points_and_drop_their_logits():
    model = _point_vit()
    image, points = torch.randn(3, 16, 16), torch.rand(5, 2) * 2 - 1
    got = classify_points(model, image, points, chunk=4, generator=torch.Generator().manual_seed(3))
    filler = torch.rand(3, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1
    padded = torch.cat([points, filler]).reshape(2, 4, 2)
    want = model(image[None].expand(2, -1, -1, -1), padded).reshape(-1, 4)[:5]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def canvases():
    from vitkit.data.canvas import load_canvas

    return load_canvas("size=32,classes=3,train=320,val=64", "canvas:size=32,classes=3,train=320,val=64")


def test_perfect_proposals_with_their_true_classes_reproduce_the_masks(canvases):
    """Stage 1 = the true regions and classes: the two-stage semantic inference gives mIoU 1."""
    from vitkit.tasks.segmentation import segmentation_metrics

    val = canvases["val"]
    k = len(val.classes)
    preds = []
    for mask in val.targets[:16]:
        p = perturbed_proposals(mask, torch.Generator().manual_seed(0), perturb=0.0)
        onehot = torch.full((len(p.labels), k + 1), -30.0)
        onehot[torch.arange(len(p.labels)), p.labels] = 30.0
        preds.append(semantic_inference(onehot, p.mask_logits).argmax(0))
    m = segmentation_metrics(torch.stack(preds), val.targets[:16], k)
    assert m["miou"] == 1.0


def test_perturbed_proposals_move_borders_but_keep_the_regions(canvases):
    mask = canvases["val"].targets[0]
    truth, _ = connected_regions(mask)
    p = perturbed_proposals(mask, torch.Generator().manual_seed(0), perturb=1.0)
    assert len(p.masks) == len(truth)
    changed = [not torch.equal(a, b) for a, b in zip(p.masks, truth)]
    assert any(changed)
    from vitkit.architecture.vitp import _dilate, _erode

    for got, r in zip(p.masks, truth):  # one pixel of dilation or erosion of its own region, no more
        assert any(torch.equal(got, v) for v in (r, _dilate(r[None])[0], _erode(r[None])[0]))
    dropped = perturbed_proposals(mask, torch.Generator().manual_seed(0), drop=1.0)
    assert len(dropped.masks) == 0


@pytest.mark.slow
def test_point_vit_and_the_mask_pooled_classifier_learn_on_canvases(canvases):
    """ViT-P trained in the one loop (point cross-entropy) classifies validation points above the
    constant guess; the stage-1 probe on frozen features of the same ViT learns the proposals' classes."""
    from vitkit.data import DataSplits
    from vitkit.models.inference import eval_transform
    from vitkit.train import TrainConfig, fit

    data = DataSplits(canvases["train"], canvases["val"], None, {})
    cfg = TrainConfig(model="vitkit_micro_p4_16", img_size=32, task="segmentation", data="canvas",
                      epochs=8, lr=2e-3, batch_size=16, warmup_epochs=1, tensorboard=False, threads=2,
                      precision="fp32")  # fmt: skip
    torch.manual_seed(0)
    model = PointViT(create_model("vitkit_micro_p4_16", num_classes=4, img_size=32))
    objective = PointObjective(n_points=32)
    tf = eval_transform(model, 32)
    before = objective.validate(model, canvases["val"], tf, torch.device("cpu"), "fp32", 64)
    result = fit(model, data, cfg, objective=objective, quiet=True)
    acc = result.val_metrics["val_point_accuracy"]
    # class-uniform points over ~3 present classes: one constant answer is right ~0.36 of the time
    assert acc > 0.42 and acc > before["val_point_accuracy"] + 0.05, (before, result.val_metrics)

    clf = MaskPooledClassifier(model.vit, num_classes=4)
    pooled, labels = [], []
    for i in range(120):
        p = perturbed_proposals(canvases["train"].targets[i], torch.Generator().manual_seed(i))
        pooled.append(clf.pooled(tf.images(canvases["train"].images[i : i + 1])[0], p.masks))
        labels.append(p.labels)
    pooled, labels = torch.cat(pooled), torch.cat(labels)
    chance = float(torch.bincount(labels).max()) / len(labels)
    clf.fit(pooled, labels)
    assert float((clf(pooled).argmax(-1) == labels).float().mean()) > chance + 0.1
