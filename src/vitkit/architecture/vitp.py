"""ViT-P's CPU stand-ins for a trained mask generator, and the whole of ViT-P under one name.

The model, the point sampling, the two-stage inference and the stage 1 from a trained segmenter live in
:mod:`vitkit.models.vitp` (``vitkit finetune SEG_RUN --task segmentation --head vitp`` builds a
:class:`~vitkit.models.vitp.ViTPSegmenter`); the training loss in
:class:`vitkit.tasks.segmentation.PointObjective`. This module adds what a check without a trained
mask generator needs (the research notes' CPU check): :func:`perturbed_proposals` (ground-truth regions,
dilated, eroded or dropped at random, with chessboard signed-distance mask logits) and
:class:`MaskPooledClassifier` (mask-averaged patch features of a frozen ViT -> linear, with a void
class), and :func:`two_stage_labels` (one image's label maps for several fusion weights at once, as the
``dense-vitp`` bench sweeps them). Shahabodini et al., "The Missing Point in Vision Transformers for
Universal Image Segmentation" (arXiv 2505.19795, 2025).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.models.vitp import (
    SEMANTIC_ALPHA,
    PointViT,
    Proposals,
    ViTPSegmenter,
    _dilate,
    _erode,
    attach_vitp_head,
    classify_points,
    connected_regions,
    fuse_class_logits,
    mask_argmax_points,
    sample_points,
    segmenter_proposals,
    semantic_inference,
    signed_depth,
    vitp_head_config,
)
from vitkit.tasks.segmentation import IGNORE_INDEX, PointObjective

__all__ = [
    "IGNORE_INDEX",
    "SEMANTIC_ALPHA",
    "MaskPooledClassifier",
    "PointObjective",
    "PointViT",
    "Proposals",
    "ViTPSegmenter",
    "attach_vitp_head",
    "classify_points",
    "connected_regions",
    "fuse_class_logits",
    "mask_argmax_points",
    "perturbed_proposals",
    "sample_points",
    "segmenter_proposals",
    "semantic_inference",
    "signed_depth",
    "two_stage_labels",
    "vitp_head_config",
]


# -- stage 1 on CPU: perturbed ground-truth regions and a weak mask classifier ---------------------------
def perturbed_proposals(
    mask: torch.Tensor, generator: torch.Generator, *, perturb: float = 0.5, drop: float = 0.0
) -> Proposals:
    """Ground-truth regions as an imperfect mask generator: each region is dilated or eroded by one
    pixel with probability ``perturb`` (half each), dropped with probability ``drop``; an eroded
    region that would vanish is kept as it was."""
    regions, labels = connected_regions(mask)
    keep = torch.rand(len(regions), generator=generator) >= drop
    regions, labels = regions[keep], labels[keep]
    out = []
    for r in regions:
        u = float(torch.rand(1, generator=generator))
        if u < perturb / 2:
            r = _dilate(r[None])[0]
        elif u < perturb:
            eroded = _erode(r[None])[0]
            r = eroded if eroded.any() else r
        out.append(r)
    masks = torch.stack(out) if out else regions
    # x4: sigmoid ≥ 0.98 inside and ≤ 0.02 outside, so that far regions barely vote in semantic inference
    return Proposals(masks, 4.0 * signed_depth(masks) if len(masks) else masks.float(), labels)


class MaskPooledClassifier(nn.Module):
    """A deliberately simple stage-1 classifier: the frozen ViT's patch features averaged over each
    proposal (its mask resampled to the patch grid as area fractions) -> Linear(D, C + 1); the last
    class is void."""

    def __init__(self, vit: nn.Module, num_classes: int):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.linear = nn.Linear(int(vit.embed_dim), num_classes + 1)

    @torch.no_grad()
    def pooled(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(Q, D) mask-averaged patch features of one image (C, H, W)."""
        feats = self.vit.forward_features(image[None])[0, int(self.vit.num_prefix_tokens) :]  # (L, D)
        gh, gw = self.vit.patch_embed.grid_size
        weights = F.adaptive_avg_pool2d(masks[:, None].float(), (gh, gw)).flatten(1)  # (Q, L)
        return weights @ feats / weights.sum(1, keepdim=True).clamp(min=1e-6)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)

    def fit(self, pooled: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 1e-2) -> None:
        """Full-batch Adam on precomputed pooled features (a linear probe)."""
        opt = torch.optim.Adam(self.linear.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(self.linear(pooled), labels).backward()
                opt.step()


@torch.no_grad()
def two_stage_labels(
    point_model: PointViT,
    image: torch.Tensor,
    proposals: Proposals,
    in_logits: torch.Tensor,
    alphas: list[float],
    chunk: int = 16,
    generator: torch.Generator | None = None,
) -> dict[float, torch.Tensor]:
    """ViT-P inference on one image: ``{alpha: (H, W) label map}`` from stage 1's proposals and class
    logits ``in_logits`` (Q, C+1), ViT-P's logits at each proposal's argmax point, fused per ``alpha``
    (0: stage 1 alone, 1: ViT-P alone), then semantic inference at the masks' size. ``image``: the
    model's input (C, H', W'), normalised; points are fractions of the size, so H' may differ from H."""
    h, w = proposals.mask_logits.shape[-2:]
    if len(proposals.masks) == 0:
        return {a: torch.zeros(h, w, dtype=torch.long) for a in alphas}
    points = mask_argmax_points(proposals.mask_logits).to(image.device)
    out_logits = classify_points(point_model, image, points, chunk, generator).float().cpu()
    labels = {}
    for a in alphas:
        cls_log = fuse_class_logits(in_logits.float().cpu(), out_logits, a)
        labels[a] = semantic_inference(cls_log, proposals.mask_logits).argmax(0)
    return labels
