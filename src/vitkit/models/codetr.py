"""Co-DETR building blocks (Zong et al., "DETRs with Collaborative Hybrid Assignments Training",
ICCV 2023): the ATSS one-to-many assignment its auxiliary head trains with, after the official code
(Sense-X/Co-DETR @26653521, ``projects/models/co_atss_head.py`` and mmdet's ``ATSSAssigner``).

Only the anchors and the assigner exist so far; the auxiliary head, the positive query groups through
the Deformable DETR decoder and their losses are planned in docs/design/codetr-plan.md (issue 20
part 3 is not done).

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

import torch

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
    labels = torch.full((a,), num_classes, dtype=torch.long)
    index = torch.full((a,), -1, dtype=torch.long)
    if len(gt_boxes) == 0 or a == 0:
        return labels, index
    iou = box_iou(anchors, gt_boxes)  # (A, G)
    ac = (anchors[:, :2] + anchors[:, 2:]) / 2
    gc = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(ac, gc)  # (A, G)
    candidates = []
    start = 0
    for n in level_counts:
        k = min(topk, n)
        candidates.append(dist[start : start + n].topk(k, dim=0, largest=False).indices + start)  # (k, G)
        start += n
    cand = torch.cat(candidates)  # (C, G)
    cand_iou = iou.gather(0, cand)
    threshold = cand_iou.mean(0) + cand_iou.std(0)  # unbiased, as torch.std and the official code
    g = torch.arange(len(gt_boxes)).expand_as(cand)
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
