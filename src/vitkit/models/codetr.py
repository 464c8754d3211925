"""Co-DETR: Zong et al., "DETRs with Collaborative Hybrid Assignments Training" (ICCV 2023), as a
training recipe on vitkit's Deformable DETR (``models/detr.py``: transformers' Deformable DETR over
ViTDet's simple feature pyramid), after the official code (Sense-X/Co-DETR @26653521:
``co_detr.py``, ``co_deformable_detr_head.py``, ``transformer.py``, the Co-Deformable-DETR R50
config). Inference is the DETR's alone (``eval_module='detr'``): a trained Co-DETR run predicts,
exports and quantizes exactly as a Deformable DETR run.

Training step (``CoDETR.forward_train``):

1. The DETR runs with its own one-to-one (Hungarian) loss. Its encoder output, split back into the
   pyramid's levels, plus one stride-2 3x3 convolution + GroupNorm of the coarsest (a new fifth
   level), is the pyramid every auxiliary head reads: not the backbone's maps.
2. Collaborative hybrid assignments: auxiliary heads with one-to-many assignment train on that
   pyramid: ATSS (``codetr_atss.py``) and Faster R-CNN (``codetr_rcnn.py``), their losses x
   (decoder layers x lambda_2) (2 x 2 = 4 with vitkit's 2 decoder layers; 12 in the paper's 6).
3. Customized positive queries: per auxiliary head, its positives (ATSS's positive anchors, the
   R-CNN's positive sampled RoIs) become one extra group of decoder queries, padded to
   max(9, most positives in an image) (at most 300) with randomly drawn negatives of that head: the
   reference point is the anchor / RoI box (normalised cx, cy, w, h, no gradient), the positional
   query a per-head Linear + LayerNorm of its sine embedding, the content query that plus a per-head
   Linear + LayerNorm of the feature at the anchor's cell (ATSS) or the RoI's mean feature (R-CNN),
   and a learned per-head embedding is added to the positional query. Each group is a separate pass
   through the same decoder and the same class / box heads, over the same (not detached) encoder
   memory. Its loss needs no matching: each query's target is the box its head assigned, sigmoid
   focal classification (2) + L1 (5) + GIoU (2) per decoder layer, divided by the positives, x
   lambda_1 = 1.

Deviations from the official code, by choice: the per-head embedding is ``nn.Embedding(K, d)`` (the
official ``nn.Embedding(K, 1, 1, 256)`` means one learnable scalar for head 0 and a frozen zero
for head 1: its authors mark it a bug); padding negatives come only from real negatives (the
official draws from all anchors); the main DETR weighs classification 1 (transformers') where the
official weighs 2, the auxiliary queries 2 as the official; no device hard-coded in the code or silent ``except``. Scaled down:
the DETR's sizes (``models/detr.py``) and the R-CNN's (``codetr_rcnn.py``). The DETR itself is
transformers' plain Deformable DETR (no two-stage, box refinement or mixed query selection, its
classification loss weight 1 rather than 2): the same detector the ``deformable-detr`` baseline
trains, so a comparison isolates the recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from vitkit.models.codetr_atss import ATSSHead, atss_loss, reduced_count
from vitkit.models.codetr_rcnn import RCNNHead
from vitkit.models.dense import DenseHeadConfig, wrap_in_head
from vitkit.models.detr import DetrDetectionModel
from vitkit.models.factory import model_input_size

CO_HEADS = ("atss", "rcnn")
LAMBDA_1 = 1.0  # the auxiliary queries' loss weight
LAMBDA_2 = 2.0  # the auxiliary heads' loss weight (times the decoder layers)
MAX_POS_QUERIES = 300
MIN_QUERIES = 9
# the official aux-query weights (the official DETR's own too; transformers' main loss weighs
# classification 1, not 2: the main branch is left as the library trains it)
QUERY_WEIGHTS = {"cls": 2.0, "bbox": 5.0, "iou": 2.0}


def aux_query_targets(
    coords: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    feats: torch.Tensor,
    num_classes: int,
    image_size: tuple[int, int],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One head's positives as query targets (``get_aux_targets``): from per-image candidates
    ``coords`` (B, A, 4) xyxy px, ``labels`` (B, A) (``num_classes`` = negative), assigned true
    ``boxes`` (B, A, 4) and ``feats`` (B, A, C), per image its positives (a random subset when
    more than N) padded to N = max(9, min(300, most positives in an image)) with random negatives.
    Returns ``(coord, labels, target, positive, feat)``: (B, N, 4) normalised cx, cy, w, h of the
    anchors / RoIs, (B, N), (B, N, 4) the same for the true boxes, (B, N) bool, (B, N, C)."""
    h, w = image_size
    scale = coords.new_tensor([w, h, w, h])
    pos = labels < num_classes
    n = max(MIN_QUERIES, min(MAX_POS_QUERIES, int(pos.sum(1).max()) if pos.numel() else 0))
    picked = []
    for i in range(len(labels)):
        p = pos[i].nonzero().flatten()
        neg = (~pos[i]).nonzero().flatten()
        if len(p) > n:
            p = p[torch.randperm(len(p), generator=generator, device="cpu").to(p.device)[:n]]
        need = n - len(p)
        if need:
            # random negatives; with too few (never for anchors, rare for RoIs) some repeat, and an
            # image of positives only repeats positives (the official code would fail there)
            pool = neg if len(neg) else p
            order = torch.randperm(len(pool), generator=generator, device="cpu").to(pool.device)
            order = order.repeat(need // len(pool) + 1)
            p = torch.cat([p, pool[order[:need]]])
        picked.append(p)
    index = torch.stack(picked)  # (B, N)
    take = lambda x: x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    coord = box_convert(take(coords) / scale, "xyxy", "cxcywh")
    target = box_convert(take(boxes) / scale, "xyxy", "cxcywh")
    lab = labels.gather(1, index)
    return coord, lab, target, lab < num_classes, take(feats)


def aux_query_loss(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
    positive: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``loss_single_aux`` for one decoder layer: focal (alpha 0.25, gamma 2) over all queries,
    L1 and GIoU over the positives, each / the positives, weights 2 / 5 / 2 x lambda_1."""
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    k = logits.shape[-1]
    num_pos = reduced_count(positive.sum(), logits.device)
    onehot = F.one_hot(labels, k + 1)[..., :k].float()
    cls = sigmoid_focal_loss(logits.float(), onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_pos
    if positive.any():
        b, t = boxes[positive].float(), target[positive].float()
        l1 = (b - t).abs().sum() / num_pos
        xyxy = (box_convert(b, "cxcywh", "xyxy"), box_convert(t, "cxcywh", "xyxy"))
        giou = generalized_box_iou_loss(*xyxy, reduction="sum", eps=1e-6) / num_pos
    else:
        l1 = giou = boxes.sum() * 0
    return {
        "cls": cls * QUERY_WEIGHTS["cls"] * LAMBDA_1,
        "bbox": l1 * QUERY_WEIGHTS["bbox"] * LAMBDA_1,
        "iou": giou * QUERY_WEIGHTS["iou"] * LAMBDA_1,
    }


class CoDetrDetectionModel(DetrDetectionModel):
    """Deformable DETR trained with Co-DETR's collaborative hybrid assignments (module docstring).
    Evaluation mode and export are the DETR's; the auxiliary modules only train."""

    def __init__(self, vit: nn.Module, config: DenseHeadConfig):
        super().__init__(vit, config)
        d, k = config.channels, config.num_classes
        _, height, _ = model_input_size(vit)
        patch = height // int(vit.patch_embed.grid_size[0])
        self.strides = [round(patch / s) for s in config.scales]
        self.strides.append(2 * self.strides[-1])  # the added level
        self.co_heads = list(config.co_heads)
        self.downsample = nn.Sequential(nn.Conv2d(d, d, 3, stride=2, padding=1), nn.GroupNorm(32, d))
        self.atss = ATSSHead(d, k, len(self.strides)) if "atss" in self.co_heads else None
        self.rcnn = RCNNHead(d, k, self.strides) if "rcnn" in self.co_heads else None
        heads = len(self.co_heads)
        self.aux_pos_trans = nn.ModuleList(nn.Linear(2 * d, 2 * d) for _ in range(heads))
        self.aux_pos_norm = nn.ModuleList(nn.LayerNorm(2 * d) for _ in range(heads))
        self.aux_feat_trans = nn.ModuleList(nn.Linear(d, d) for _ in range(heads))
        self.aux_feat_norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(heads))
        self.head_pos_embed = nn.Embedding(heads, d)
        for m in (*self.aux_pos_trans, *self.aux_feat_trans, self.head_pos_embed):
            nn.init.xavier_uniform_(m.weight)  # mmdet's transformer init_weights: xavier on every matrix
        self.weight_aux_heads = int(self.detr.config.decoder_layers) * LAMBDA_2

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        if not (self.training and targets is not None):
            return super().forward(images, targets)
        geometry: dict = {}

        def keep(_module, _args, kwargs):  # the encoder's inputs: the pyramid's geometry and mask
            geometry.update(kwargs)

        handle = self.detr.model.encoder.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            out = self.detr(pixel_values=images, labels=self.detr_labels(images, targets))
        finally:
            handle.remove()
        losses = {"detr": out.loss}
        memory = out.encoder_last_hidden_state
        shapes = [tuple(int(v) for v in s) for s in geometry["spatial_shapes_list"]]
        b, _, d = memory.shape
        maps = [
            m.transpose(1, 2).reshape(b, d, h, w)
            for m, (h, w) in zip(memory.split([h * w for h, w in shapes], 1), shapes)
        ]
        maps.append(self.downsample(maps[-1]))
        image_size = tuple(images.shape[-2:])
        for h, name in enumerate(self.co_heads):
            if name == "atss":
                head_losses, (anchors, labels, boxes) = atss_loss(
                    self.atss, maps, self.strides, targets, self.weight_aux_heads
                )
                coords = anchors.expand(b, -1, -1)
                feats = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
            else:
                head_losses, (coords, labels, boxes, feats) = self.rcnn(
                    maps, image_size, targets, self.weight_aux_heads
                )
            losses.update(head_losses)
            q = aux_query_targets(coords, labels, boxes, feats, self.num_classes, image_size)
            for key, v in self._aux_decoder_loss(h, memory, geometry, *q).items():
                losses[f"{name}_query_{key}"] = v
        return losses

    def _aux_decoder_loss(
        self,
        h: int,
        memory: torch.Tensor,
        geometry: dict,
        coord: torch.Tensor,
        labels: torch.Tensor,
        target: torch.Tensor,
        positive: torch.Tensor,
        feat: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One positive-query group through the shared decoder and heads (``forward_aux``), its
        fixed-target loss summed over the decoder layers."""
        from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

        model = self.detr.model
        d = memory.shape[-1]
        embed = model.get_proposal_pos_embed(inverse_sigmoid(coord)).to(memory.dtype)
        pe = self.aux_pos_norm[h](self.aux_pos_trans[h](embed))
        query_pos, content = pe.split(d, -1)
        content = content + self.aux_feat_norm[h](self.aux_feat_trans[h](feat.to(memory.dtype)))
        query_pos = query_pos + self.head_pos_embed.weight[h]
        dec = model.decoder(
            inputs_embeds=content,
            object_queries_position_embeddings=query_pos,
            encoder_hidden_states=memory,
            encoder_attention_mask=geometry["attention_mask"],
            reference_points=coord,
            spatial_shapes=geometry["spatial_shapes"],
            spatial_shapes_list=geometry["spatial_shapes_list"],
            level_start_index=geometry["level_start_index"],
            valid_ratios=geometry["valid_ratios"],
        )
        hidden, refs = dec.intermediate_hidden_states, dec.intermediate_reference_points
        total: dict[str, torch.Tensor] = {}
        for layer in range(hidden.shape[1]):
            ref = coord if layer == 0 else refs[:, layer - 1]
            logits = self.detr.class_embed[layer](hidden[:, layer])
            boxes = (self.detr.bbox_embed[layer](hidden[:, layer]) + inverse_sigmoid(ref)).sigmoid()
            for key, v in aux_query_loss(logits, boxes, labels, target, positive).items():
                total[key] = total.get(key, 0) + v
        return total


def attach_codetr_head(model: nn.Module, config: DenseHeadConfig) -> CoDetrDetectionModel:
    """Wrap a plain ViT (no classifier) into Deformable DETR with Co-DETR's training heads."""
    return wrap_in_head(model, config, CoDetrDetectionModel)
