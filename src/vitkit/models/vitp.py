"""ViT-P: Shahabodini et al., "The Missing Point in Vision Transformers for Universal Image
Segmentation" (arXiv 2505.19795, 2025), after the official code (github.com/sajjad-sh33/ViT-P @ 1596e6f:
``ViT-P/dinov2/models/vision_transformer.py``, ``ViT-P/dinov2/data/datasets/ADE20k_P.py``,
``OneFormer/oneformer/oneformer_model.py``).

Two-stage mask classification. **Stage 1**, any mask generator, proposes Q masks (per-pixel logits)
with class logits over C classes + void. **Stage 2**, ViT-P, classifies one *point* per mask: a ViT
whose class token is replaced by P point tokens ``t_i = W (row_i, col_i) + pos_cls`` (``W`` a
``Linear(2 -> D, bias=False)``, ``pos_cls`` the class token's position embedding, the same for every
point; coordinates ``index / size`` mapped to [-1, 1], row first), full self-attention with the patch
tokens, ``logits_i = head(norm(t_i))``. Trained with cross-entropy on points drawn from the ground
truth: P classes drawn uniformly among those present (with replacement), one random pixel of each.
At inference each proposal's point is the argmax pixel of its mask logits, points go through the ViT
in chunks of P (the last chunk padded with random points, discarded), and the class probabilities
are fused: ``normalise(softmax(p_in[:C])^(1-α) · softmax(p_out)^α) · (1 - p_void)``, α = 0.4 for
semantic segmentation, the void probability from stage 1; then the usual semantic inference
``argmax_c Σ_q p_q(c) · sigmoid(mask_q)``.

:class:`PointViT` wraps a plain timm ``VisionTransformer`` (its ``patch_embed``, ``pos_embed``,
``norm_pre``, ``blocks``, ``norm`` and ``head`` are called in order; nothing is forked or patched).
``tests/architecture/vitp_reference.py`` re-implements the official token preparation and fusion; the
tests match them to 1e-6.

Faithful, including what the notes of the paper get wrong: the official ``init_weights`` draws the
point embedding with std 1e-6 and then ``named_apply(init_weights_vit_timm)`` overwrites every
``nn.Linear`` (the point embedding too) with a truncated normal of std 0.02: that is what the code
trains from, and what vitkit does.

Our choices (say so):
- no position-embedding interpolation at the native grid (the official ``interpolate_pos_encoding``
  always interpolates, since it counts the P point tokens as patches: a bicubic resample of the
  grid onto itself with DINOv2's 0.1 offset);
- the background of vitkit's dense data is a class like any other and is sampled (the official
  dataset drops mask value 0, ADE20K's "other", from the sampled classes); the ignore index 255 is
  never sampled;
- models with register tokens or without a class token are refused (the official code inserts
  registers after the points; vitkit's presets have none);
- stage 1 on CPU is :func:`perturbed_proposals` (ground-truth regions, dilated, eroded or dropped at
  random, with chessboard signed-distance mask logits, so that the argmax pixel is a region's
  innermost one) plus :class:`MaskPooledClassifier` (mask-averaged patch features of a frozen ViT ->
  linear), as the research notes propose for a CPU check; the paper uses OneFormer / Mask2Former;
- the official inference moves tensors with a hard-coded ``.to('cuda')``; here everything stays on
  the input's device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.data.dense import IGNORE_INDEX
from vitkit.errors import VitkitError
from vitkit.models.dense import (
    DenseHeadConfig,
    DenseModel,
    attach_dense_head,
    prefixed_group_matcher,
    validated_head_config,
)
from vitkit.models.factory import final_norm, model_input_size
from vitkit.models.manifest import MANIFEST_ATTR, Manifest, get_manifest, set_manifest

SEMANTIC_ALPHA = 0.4  # official configs: MODEL.alpha_semantic


# -- stage 2: the point-token ViT -----------------------------------------------------------------------
class PointViT(nn.Module):
    """A timm ViT whose class token is replaced by point tokens. ``forward(images, points)``:
    images (B, C, H, W), points (B, P, 2) as (row, col) in [-1, 1] -> class logits (B, P, K)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        for name in ("patch_embed", "pos_embed", "blocks", "head"):
            if getattr(vit, name, None) is None:
                raise VitkitError(
                    f"vitp: needs a timm VisionTransformer with `{name}`; {type(vit).__name__} has none"
                )
        if getattr(vit, "cls_token", None) is None or int(getattr(vit, "num_reg_tokens", 0)):
            raise VitkitError(
                "vitp: the ViT must have a class token and no register tokens (the point tokens take the "
                "class token's place and its position embedding)"
            )
        if getattr(vit, "no_embed_class", False):
            raise VitkitError("vitp: the class token needs its own position embedding (no_embed_class=False)")
        if not isinstance(vit.head, nn.Linear):
            raise VitkitError("vitp: the ViT needs a linear classification head (num_classes > 0)")
        self.vit = vit
        vit.cls_token.requires_grad_(False)  # replaced by the points: unused (DDP would refuse it)
        # the loop and the eval transform read the input size and normalisation from here
        self.pretrained_cfg = dict(getattr(vit, "pretrained_cfg", {}) or {})
        dim = int(vit.embed_dim)
        self.point_embed = nn.Linear(2, dim, bias=False)
        # official: std 1e-6, then overwritten by init_weights_vit_timm's trunc_normal_(std=.02)
        nn.init.trunc_normal_(self.point_embed.weight, std=0.02)
        self.num_classes = int(vit.head.out_features)

    def no_weight_decay(self) -> set[str]:
        """The ViT's own exemptions (position embedding, tokens), under this wrapper's names."""
        inner = self.vit.no_weight_decay() if hasattr(self.vit, "no_weight_decay") else set()
        return {f"vit.{name}" for name in inner}

    def forward(self, images: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        pos = vit.pos_embed
        h, w = images.shape[-2:]
        ph, pw = vit.patch_embed.patch_size
        want = tuple(getattr(vit.patch_embed, "img_size", None) or ())
        strict = getattr(vit.patch_embed, "strict_img_size", False)
        if (h // ph) * (w // pw) != pos.shape[1] - 1 or (strict and want and (h, w) != want):
            raise VitkitError(
                f"vitp: a {h}x{w} image gives {(h // ph) * (w // pw)} patches; the ViT's position embedding "
                f"holds {pos.shape[1] - 1} (build the ViT at the data's size)"
            )
        x = vit.patch_embed(images)
        if x.ndim == 4:  # NHWC from a dynamic-size patch embedding
            x = x.flatten(1, 2)
        tokens = self.point_embed(points.to(x.dtype)) + pos[:, :1]
        x = torch.cat([tokens, x + pos[:, 1:]], dim=1)
        x = vit.norm_pre(x)
        for blk in vit.blocks:
            x = blk(x)
        x = final_norm(vit)(x)  # norm, or fc_norm in timm's average-pool layout, per token
        return vit.head(x[:, : points.shape[1]])


def sample_points(
    masks: torch.Tensor, n_points: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training points (official ``ADE20k_P.__getitem__``): per image, ``n_points`` classes drawn
    uniformly among those present (with replacement), then one uniformly random pixel of each.

    Args:
        masks: (B, H, W) class indices, ``IGNORE_INDEX`` never drawn.
    Returns:
        points (B, P, 2) = ``2 * (row / H, col / W) - 1`` and labels (B, P).
    """
    b, h, w = masks.shape
    points = torch.empty(b, n_points, 2)
    labels = torch.full((b, n_points), IGNORE_INDEX, dtype=torch.long)
    flat = masks.reshape(b, -1).cpu()
    for i in range(b):
        present = torch.unique(flat[i])
        present = present[present != IGNORE_INDEX]
        if len(present) == 0:  # nothing to learn here: the points are ignored by the loss
            points[i] = torch.rand(n_points, 2, generator=generator) * 2 - 1
            continue
        drawn = present[torch.randint(len(present), (n_points,), generator=generator)]
        pixels = {c: torch.nonzero(flat[i] == c).flatten() for c in drawn.unique().tolist()}
        for j, c in enumerate(drawn.tolist()):
            where = pixels[c]
            k = int(where[torch.randint(len(where), (1,), generator=generator)])
            points[i, j, 0], points[i, j, 1] = k // w / h, k % w / w
            labels[i, j] = c
    return (2 * points - 1).to(masks.device), labels.to(masks.device)


# -- inference: points from proposals, chunks, fusion, semantic maps -----------------------------------------
def mask_argmax_points(mask_logits: torch.Tensor) -> torch.Tensor:
    """(Q, H, W) mask logits -> (Q, 2) points, each the argmax pixel as ``2 * (row/H, col/W) - 1``
    (official ``create_class_tensor_no_loop``)."""
    q, h, w = mask_logits.shape
    idx = torch.argmax(mask_logits.reshape(q, -1), dim=1)
    rows, cols = torch.div(idx, w, rounding_mode="floor"), idx % w
    return 2 * torch.stack([rows / float(h), cols / float(w)], dim=-1) - 1


@torch.no_grad()
def classify_points(
    model: PointViT,
    image: torch.Tensor,
    points: torch.Tensor,
    chunk: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Class logits (Q, K) of Q points on one image (C, H, W), run in chunks of ``chunk`` points;
    the last chunk is padded with random points whose logits are discarded (official)."""
    q = len(points)
    if q == 0:
        return torch.zeros(0, model.num_classes, device=image.device)
    pad = (-q) % chunk
    if pad:
        filler = torch.rand(pad, 2, generator=generator).to(points) * 2 - 1
        points = torch.cat([points, filler])
    chunks = points.reshape(-1, chunk, 2)
    logits = model(image.unsqueeze(0).expand(len(chunks), -1, -1, -1), chunks)
    return logits.reshape(-1, logits.shape[-1])[:q]


def fuse_class_logits(in_logits: torch.Tensor, out_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Official fusion: stage 1's (Q, C+1) logits (last = void) and ViT-P's (Q, C) -> (Q, C+1)
    log-probabilities ``log(normalise(softmax(in[:C])^(1-α) softmax(out)^α) (1 - p_void) ; p_void)``."""
    # (1-α) log p_in + α log p_out, then softmax: the official value, without its underflow to
    # log(0) = -inf (and a NaN softmax) when the two disagree by ~100 logits
    fused = ((1 - alpha) * in_logits[..., :-1].log_softmax(-1) + alpha * out_logits.log_softmax(-1)).softmax(
        -1
    )
    void = in_logits.softmax(-1)[..., -1:]
    return torch.log(torch.cat([fused * (1.0 - void), void], dim=-1) + 1e-8)


def semantic_inference(cls_log: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """(Q, C+1) class logits, (Q, H, W) mask logits -> (C, H, W) scores ``Σ_q softmax(cls)[:C] sigmoid(mask)``
    (Mask2Former / OneFormer ``semantic_inference``)."""
    return torch.einsum("qc,qhw->chw", cls_log.softmax(-1)[..., :-1], mask_logits.sigmoid())


# -- regions: connected components, erosion, signed depth ---------------------------
def _dilate(m: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(m[:, None].float(), 3, 1, 1)[:, 0] > 0


def _erode(m: torch.Tensor, border_outside: bool = False) -> torch.Tensor:
    """3x3 erosion; ``border_outside``: the image border counts as outside the mask."""
    if not border_outside:
        return ~_dilate(~m)
    padded = F.pad((~m)[:, None].float(), (1, 1, 1, 1), value=1.0)
    return F.max_pool2d(padded, 3, 1, 0)[:, 0] == 0


def connected_regions(
    mask: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-connected regions of each class of a (H, W) label map: (R, H, W) bool masks and (R,)
    labels (ignored pixels belong to none)."""
    h, w = mask.shape
    masks, labels = [], []
    for c in torch.unique(mask).tolist():
        if c == ignore_index:
            continue
        region = mask == c
        ids = torch.where(region, torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w), 0.0)
        while True:  # propagate the largest id through each region until nothing changes
            grown = F.max_pool2d(ids[None, None], 3, 1, 1)[0, 0] * region
            if torch.equal(grown, ids):
                break
            ids = grown
        for v in torch.unique(ids[region]).tolist():
            masks.append(ids == v)
            labels.append(c)
    if not masks:
        return torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
    return torch.stack(masks), torch.tensor(labels, dtype=torch.long)


def signed_depth(masks: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """Chessboard signed distance of (Q, H, W) bool masks: inside k ≥ 1 = erosions survived (the image
    border counts as outside), outside -k = dilations needed (capped at ``steps``); its argmax is a
    region's innermost pixel, never one on the region's or the image's edge unless the region is thin."""
    inside = torch.zeros(masks.shape)
    outside = torch.zeros(masks.shape)
    m, o = masks.clone(), ~masks
    for _ in range(steps if steps is not None else max(masks.shape[-2:])):
        if not (m.any() or o.any()):
            break
        if m.any():
            inside += m
            m = _erode(m, border_outside=True)
        if o.any():
            outside += o
            o = _erode(o)
    return torch.where(masks, inside, -outside)


@dataclass
class Proposals:
    """Stage 1's output for one image: masks (Q, H, W) bool, mask logits (Q, H, W), true labels (Q,)."""

    masks: torch.Tensor
    mask_logits: torch.Tensor
    labels: torch.Tensor


# -- stage 1 from a trained one-stage segmenter ---------------------------------------------------------------
@torch.no_grad()
def segmenter_proposals(logits: torch.Tensor) -> tuple[Proposals, torch.Tensor]:
    """Mask proposals from a one-stage segmenter's (K, H, W) logits: the 8-connected regions of its
    label map, mask logits ``4 * signed_depth`` (so a region's argmax point is its innermost pixel and
    sigmoid ≥ 0.98 inside, ≤ 0.02 outside), class logits (Q, K + 1) = log of the segmenter's class
    probabilities averaged over the region, the void column (last) at ~0 probability: the regions tile
    the image, nothing is rejected. Labels: the class each region was cut from."""
    k = logits.shape[0]
    probs = logits.float().softmax(0)
    regions, labels = connected_regions(probs.argmax(0))
    if len(regions) == 0:
        empty = torch.zeros(0, *logits.shape[-2:])
        return Proposals(regions, empty, labels), torch.zeros(0, k + 1)
    weights = regions.flatten(1).float()  # (Q, HW)
    mean = weights @ probs.flatten(1).T / weights.sum(1, keepdim=True)  # (Q, K)
    in_logits = torch.cat([mean.clamp(min=1e-8).log(), torch.full((len(regions), 1), -30.0)], 1)
    return Proposals(regions, 4.0 * signed_depth(regions), labels), in_logits


class ViTPSegmenter(nn.Module):
    """The two stages as one segmentation model: a frozen one-stage segmenter (``stage1``, a
    :class:`~vitkit.models.dense.DenseModel`) proposes regions, ViT-P (``point_vit``) classifies each
    region's innermost point, the two class estimates are fused (``alpha``) and semantic inference
    gives (B, K, H, W) log-scores, so evaluation, overlays and predictions work as for any dense
    model. ``forward(images, points)`` is ViT-P alone (training: the point objective)."""

    def __init__(self, stage1: DenseModel, point_vit: PointViT, config: DenseHeadConfig):
        super().__init__()
        self.config = config
        self.stage1 = stage1.eval().requires_grad_(False)  # stage 1 is trained already; never updated
        self.point_vit = point_vit
        self.num_classes = config.num_classes
        self.pretrained_cfg = dict(point_vit.pretrained_cfg)
        self.pretrained_cfg["input_size"] = model_input_size(point_vit.vit)

    def train(self, mode: bool = True) -> ViTPSegmenter:
        super().train(mode)
        self.stage1.eval()  # its BatchNorm statistics stay those it was trained with
        return self

    def no_weight_decay(self) -> set[str]:
        return {f"point_vit.{name}" for name in self.point_vit.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer groups of ViT-P's ViT (layer-wise LR decay); the point embedding matches none
        and joins the last group, as a head does."""
        return prefixed_group_matcher(self.point_vit.vit, "point_vit.vit.", coarse)

    def forward(self, images: torch.Tensor, points: torch.Tensor | None = None) -> torch.Tensor:
        if points is not None:
            return self.point_vit(images, points)
        return self.segment(images)

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, K, H, W) log of the fused semantic scores. The padding points of
        an image's last chunk come from a fixed seed per image (the points attend to each other), so a
        prediction depends neither on the batch it is in nor on what ran before."""
        seg = self.stage1(images).float()
        out = []
        for image, logits in zip(images, seg):
            generator = torch.Generator().manual_seed(0)
            proposals, in_logits = segmenter_proposals(logits.cpu())
            if len(proposals.masks) == 0:
                out.append(logits.log_softmax(0))
                continue
            points = mask_argmax_points(proposals.mask_logits).to(image.device)
            out_logits = classify_points(self.point_vit, image, points, self.config.points, generator)
            cls_log = fuse_class_logits(in_logits, out_logits.float().cpu(), self.config.alpha)
            scores = semantic_inference(cls_log, proposals.mask_logits)
            out.append(scores.clamp(min=1e-6).log().to(images.device))
        return torch.stack(out)


def attach_vitp_head(
    model: nn.Module, config: DenseHeadConfig, stage1: DenseModel | None = None
) -> ViTPSegmenter:
    """Wrap a plain timm ViT into ViT-P over a stage-1 segmenter; the manifest moves to the wrapper.

    ``stage1``: the trained segmenter (frozen inside the result); None builds its structure from
    ``config.stage1`` on a copy of ``model`` (the same architecture), for ``vitkit.load`` to fill in."""
    if config.head != "vitp" or config.stage1 is None:
        raise VitkitError("attach_vitp_head takes a head config with head 'vitp' and its stage1")
    manifest = get_manifest(model)
    if stage1 is None:
        twin = copy.deepcopy(model)
        twin.__dict__.pop(MANIFEST_ATTR, None)
        stage1 = attach_dense_head(twin, config.stage1)
    elif stage1.config.model_dump() != config.stage1.model_dump():
        raise VitkitError("attach_vitp_head: stage1's head is not the one the config records")
    else:
        stage1.__dict__.pop(MANIFEST_ATTR, None)  # a trained run's model: the wrapper's manifest covers it
    if int(getattr(model, "num_classes", 0)) != config.num_classes:
        model.reset_classifier(config.num_classes)
        if manifest is not None:
            manifest.kwargs["num_classes"] = config.num_classes
    out = ViTPSegmenter(stage1, PointViT(model), config)
    if manifest is not None:
        model.__dict__.pop(MANIFEST_ATTR, None)  # one manifest, on the outermost model
        set_manifest(
            out, Manifest(manifest.name, manifest.kwargs, manifest.transforms, head=config.model_dump())
        )
    return out


def vitp_head_config(stage1: DenseModel, points: int = 32, alpha: float = SEMANTIC_ALPHA) -> DenseHeadConfig:
    """The head config of ViT-P over the trained segmenter ``stage1``."""
    s = stage1.config
    if s.task != "segmentation" or s.head == "vitp":
        raise VitkitError(
            f"vitp: stage 1 must be a one-stage segmentation model, not a {s.task} {s.head} head"
        )
    return validated_head_config(
        dict(
            task="segmentation",
            head="vitp",
            num_classes=s.num_classes,
            channels=s.channels,
            indices=s.indices,
            in_chans=s.in_chans,
            points=points,
            alpha=alpha,
            stage1=s.model_dump(),
        ),
        "vitp head",
    )
