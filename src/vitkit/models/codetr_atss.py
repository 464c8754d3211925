"""Co-DETR's auxiliary ATSS head (Zong et al., "DETRs with Collaborative Hybrid Assignments
Training", ICCV 2023): anchors, the one-to-many ATSS assignment, the head and its losses, after the
official code (Sense-X/Co-DETR @26653521, ``projects/models/co_atss_head.py``, the R50 config, and
mmdet's ``ATSSAssigner``). ``models/codetr.py`` runs it on the Deformable DETR encoder's output.

Anchors: one square anchor per pyramid cell, side ``8 * stride``, centred at ``(j * stride, i *
stride)`` (mmdet's ``center_offset=0``, not the cell centre), level-major then row-major: the order of
the flattened encoder memory. Assignment (Zhang et al., "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020), per image: for each true
box and each level, the ``topk`` anchors whose centres are closest to the box's centre are
candidates; the IoU threshold is the candidates' mean + standard deviation (unbiased); a candidate is
positive when its IoU reaches the threshold and its centre lies inside the box (by more than 0.01 px);
an anchor positive for several boxes goes to the one it overlaps most.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ANCHOR_SCALE = 8
TOPK = 9
INSIDE_EPS = 0.01


def atss_anchors(
    level_shapes: list[tuple[int, int]], strides: list[int], scale: int = ANCHOR_SCALE
) -> torch.Tensor:
    """(A, 4) xyxy anchors in pixels for pyramid levels of (h, w) cells at ``strides``."""
    out = []
    for (h, w), s in zip(level_shapes, strides):
        ys, xs = torch.meshgrid(torch.arange(h) * float(s), torch.arange(w) * float(s), indexing="ij")
        half = scale * s / 2
        cx, cy = xs.flatten(), ys.flatten()
        out.append(torch.stack([cx - half, cy - half, cx + half, cy + half], 1))
    return torch.cat(out)


def atss_assign(
    anchors: torch.Tensor,
    level_counts: list[int],
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    num_classes: int,
    topk: int = TOPK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's ATSS assignment: ``(labels (A,), gt_index (A,))``; a negative anchor has label
    ``num_classes`` (background) and index -1."""
    from torchvision.ops import box_iou

    a = len(anchors)
    labels = torch.full((a,), num_classes, dtype=torch.long, device=anchors.device)
    index = torch.full((a,), -1, dtype=torch.long, device=anchors.device)
    if len(gt_boxes) == 0 or a == 0:
        return labels, index
    iou = box_iou(anchors, gt_boxes)  # (A, G)
    ac = (anchors[:, :2] + anchors[:, 2:]) / 2
    gc = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(
        ac, gc, compute_mode="donot_use_mm_for_euclid_dist"
    )  # (A, G), exact: near-ties keep their order
    candidates = []
    start = 0
    for n in level_counts:
        k = min(topk, n)
        candidates.append(dist[start : start + n].topk(k, dim=0, largest=False).indices + start)  # (k, G)
        start += n
    cand = torch.cat(candidates)  # (C, G)
    cand_iou = iou.gather(0, cand)
    threshold = cand_iou.mean(0) + cand_iou.std(0)  # unbiased, as torch.std and the official code
    g = torch.arange(len(gt_boxes), device=anchors.device).expand_as(cand)
    cx, cy = ac[cand, 0], ac[cand, 1]
    box = gt_boxes[g]
    inside = torch.stack([cx - box[..., 0], cy - box[..., 1], box[..., 2] - cx, box[..., 3] - cy], -1).amin(
        -1
    )
    positive = (cand_iou >= threshold[None]) & (inside > INSIDE_EPS)
    # an anchor positive for several boxes goes to the one it overlaps most
    chosen = torch.full_like(iou, -1.0)
    chosen[cand[positive], g[positive]] = iou[cand[positive], g[positive]]
    best, which = chosen.max(1)
    pos = best >= 0
    labels[pos] = gt_labels[which[pos]]
    index[pos] = which[pos]
    return labels, index


# -- the auxiliary ATSS head (co_atss_head.py) ---------------------------------------------------
ATSS_WEIGHTS = {"cls": 1.0, "bbox": 2.0, "centerness": 1.0}  # x (decoder layers x lambda_2) in CoDetr
DELTA_STDS = (0.1, 0.1, 0.2, 0.2)
_MAX_LOG_RATIO = abs(math.log(16 / 1000))


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv's ``Scale``), one per pyramid level."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def decode_deltas(deltas: torch.Tensor, anchors: torch.Tensor, stds=DELTA_STDS) -> torch.Tensor:
    """mmdet's ``DeltaXYWHBBoxCoder.decode`` (means 0): (..., 4) deltas on (..., 4) xyxy anchors ->
    xyxy boxes; log-size deltas clamped at |log(16 / 1000)|."""
    s = deltas.new_tensor(stds)
    dx, dy, dw, dh = (deltas * s).unbind(-1)
    dw, dh = dw.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO), dh.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    pw, ph = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    px, py = (anchors[..., 0] + anchors[..., 2]) / 2, (anchors[..., 1] + anchors[..., 3]) / 2
    cx, cy, w, h = px + pw * dx, py + ph * dy, pw * dw.exp(), ph * dh.exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def centerness_target(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """ATSS's centerness of each anchor centre in its box: sqrt(min(l, r) / max(l, r) * min(t, b) /
    max(t, b))."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    left, t = cx - boxes[:, 0], cy - boxes[:, 1]
    r, b = boxes[:, 2] - cx, boxes[:, 3] - cy
    lr = torch.minimum(left, r) / torch.maximum(left, r)
    tb = torch.minimum(t, b) / torch.maximum(t, b)
    return (lr * tb).clamp(min=0).sqrt()


def reduced_count(n: torch.Tensor | float, device: torch.device) -> float:
    """A count averaged over the processes of a distributed run (mmdet's ``reduce_mean``), at least 1.
    Every process must call it the same number of times."""
    t = torch.as_tensor(float(n), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t = t / torch.distributed.get_world_size()
    return max(float(t), 1.0)


class ATSSHead(nn.Module):
    """The auxiliary ATSS head of Co-DETR's R50 config (``stacked_convs=1``): a 3x3 conv + GroupNorm
    (32) + ReLU tower each for classification and regression, shared over the levels; a 3x3 conv to
    the class logits (bias prior 0.01), one to the 4 box deltas (times a learnable per-level scale)
    and one to the centerness logit; weights normal(0, 0.01)."""

    def __init__(self, channels: int, num_classes: int, levels: int):
        super().__init__()

        def tower() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(32, channels), nn.ReLU()
            )

        self.num_classes = num_classes
        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per anchor, level-major then row-major: class logits (B, A, K), deltas (B, A, 4),
        centerness logits (B, A)."""
        cls, reg, ctr = [], [], []
        for x, scale in zip(maps, self.scales):
            c, r = self.cls_tower(x), self.reg_tower(x)
            cls.append(self.cls(c).flatten(2).transpose(1, 2))
            reg.append(scale(self.reg(r)).float().flatten(2).transpose(1, 2))
            ctr.append(self.centerness(r).flatten(1))
        return torch.cat(cls, 1), torch.cat(reg, 1), torch.cat(ctr, 1)


def atss_loss(
    head: ATSSHead,
    maps: list[torch.Tensor],
    strides: list[int],
    targets: list[dict[str, torch.Tensor]],
    weight: float,
) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The ATSS head's losses on a pyramid and the assignment Co-DETR turns into queries.

    Losses (co_atss_head.py ``loss``; ``weight`` = decoder layers x lambda_2, 12 in the paper's
    config): sigmoid focal classification (alpha 0.25, gamma 2) over all anchors / N, where N = the
    sum over images of max(positives, 1);
    GIoU of the decoded positives weighted by their centerness target / the sum of those targets
    (at least 1); centerness BCE / N. Returns ``(losses, (anchors (A, 4) xyxy px, labels
    (B, A) with ``num_classes`` = background, assigned true boxes (B, A, 4)))``.
    """
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    k = head.num_classes
    shapes = [tuple(m.shape[-2:]) for m in maps]
    counts = [h * w for h, w in shapes]
    device = maps[0].device
    anchors = atss_anchors(shapes, strides).to(device)
    cls, reg, ctr = head(maps)
    labels, boxes = [], []
    for t in targets:
        lab, idx = atss_assign(anchors, counts, t["boxes"].float().to(device), t["labels"].to(device), k)
        labels.append(lab.to(device))
        gt = t["boxes"].float().to(device)
        boxes.append(gt[idx.clamp(min=0)] if len(gt) else anchors.new_zeros(anchors.shape))
    labels_t, boxes_t = torch.stack(labels), torch.stack(boxes)
    pos = labels_t < k
    # the official normaliser: sum over images of max(positives, 1) (atss_head.get_targets), averaged over processes
    num_pos = reduced_count(pos.sum(1).clamp(min=1).sum(), device)
    onehot = torch.nn.functional.one_hot(labels_t, k + 1)[..., :k].to(cls.dtype)
    loss_cls = (
        sigmoid_focal_loss(cls.float(), onehot.float(), alpha=0.25, gamma=2.0, reduction="sum") / num_pos
    )
    if pos.any():
        a = anchors.expand(len(targets), -1, -1)[pos]
        gt = boxes_t[pos]
        ctr_t = centerness_target(a, gt)
        decoded = decode_deltas(reg[pos], a)
        giou = generalized_box_iou_loss(decoded, gt, reduction="none", eps=1e-6)
        loss_bbox = (giou * ctr_t).sum() / reduced_count(ctr_t.sum(), device)
        loss_ctr = (
            torch.nn.functional.binary_cross_entropy_with_logits(ctr[pos].float(), ctr_t, reduction="sum")
            / num_pos
        )
    else:  # no true box in the batch: zero losses that keep the graph
        loss_bbox = reg.sum() * 0
        loss_ctr = ctr.sum() * 0
    losses = {
        "atss_cls": loss_cls * ATSS_WEIGHTS["cls"] * weight,
        "atss_bbox": loss_bbox * ATSS_WEIGHTS["bbox"] * weight,
        "atss_centerness": loss_ctr * ATSS_WEIGHTS["centerness"] * weight,
    }
    return losses, (anchors, labels_t, boxes_t)
