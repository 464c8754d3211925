"""Co-DETR's auxiliary Faster R-CNN head (Zong et al., "DETRs with Collaborative Hybrid Assignments
Training", ICCV 2023; Ren et al., "Faster R-CNN", NeurIPS 2015), built from torchvision's detection
parts (``RegionProposalNetwork``, ``RoIHeads``' proposal sampling, ``MultiScaleRoIAlign``,
``TwoMLPHead``, ``FastRCNNPredictor``) after the official R50 config and ``co_roi_head.py``
(Sense-X/Co-DETR @26653521).

As the official config: RPN on all five levels (anchors 4 x stride x 2^(0, 1/3, 2/3), ratios 1/2,
1, 2; IoU 0.7 / 0.3; 256 samples per image, half positive; NMS 0.7); RoI sampling at IoU 0.5 with
a quarter positives and the true boxes added as proposals; RoIAlign 7 x 7 on the four encoder
levels; classification cross-entropy over the sampled RoIs; box regression as GIoU of the decoded
class-specific box (deltas normalised by (0.1, 0.1, 0.2, 0.2)) / the sampled RoIs, weight 10; all
losses x (decoder layers x lambda_2). The sampled RoIs, their labels and true boxes, and their
RoI features averaged over the 7 x 7 cells are what Co-DETR turns into decoder queries.

Scaled down, sizes only: 1000 proposals per image before and after NMS (4000 / 1000), 128 sampled
RoIs per image (512), a 4 x channels MLP (1024). Deviations: torchvision's RPN regresses with
smooth-L1 (beta 1/9) where the config names L1, keeps each true box's best anchor as a positive at
any IoU (the config: at IoU >= 0.3), takes a level's anchor pitch as image size // cells (56 rather
than 64 for the added level of a 224 px input) and rounds its base anchors; its RoIAlign picks a
box's level by torchvision's canonical rule (224 px at level 4) rather than mmdet's
``finest_scale`` 112.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.models.codetr_atss import decode_deltas

RCNN_WEIGHTS = {"rpn_cls": 1.0, "rpn_bbox": 1.0, "rcnn_cls": 1.0, "rcnn_bbox": 10.0}
PROPOSALS = 1000
ROIS_PER_IMAGE = 128


class RCNNHead(nn.Module):
    """RPN + RoI head over the encoder pyramid (levels finest first; the last one is used only by
    the RPN, as the official config's four RoI strides)."""

    def __init__(self, channels: int, num_classes: int, strides: list[int]):
        super().__init__()
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.roi_heads import RoIHeads
        from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
        from torchvision.ops import MultiScaleRoIAlign

        self.num_classes = num_classes
        sizes = tuple(tuple(4 * s * 2 ** (i / 3) for i in range(3)) for s in strides)
        anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(strides))
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={"training": PROPOSALS, "testing": PROPOSALS},
            post_nms_top_n={"training": PROPOSALS, "testing": PROPOSALS},
            nms_thresh=0.7,
        )
        self.roi_levels = [str(i) for i in range(len(strides) - 1)]
        hidden = 4 * channels
        self.roi = RoIHeads(
            MultiScaleRoIAlign(self.roi_levels, output_size=7, sampling_ratio=0),
            TwoMLPHead(channels * 49, hidden),
            FastRCNNPredictor(hidden, num_classes + 1),  # torchvision's class 0 is the background
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=ROIS_PER_IMAGE,
            positive_fraction=0.25,
            bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=100,
        )

    def forward(
        self,
        maps: list[torch.Tensor],
        image_size: tuple[int, int],
        targets: list[dict[str, torch.Tensor]],
        weight: float,
    ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Losses and the sampled RoIs as ``(boxes (B, R, 4) xyxy px, labels (B, R) with
        ``num_classes`` = background, assigned true boxes (B, R, 4), RoI features (B, R, C))``, each
        image's positives first (mmdet's sampling order), cut to the fewest RoIs of an image."""
        # float32 throughout, as the official force_fp32: torchvision decodes proposals in the deltas'
        # dtype and matches the true boxes in the proposals', so bf16 would round boxes by ~0.4%
        with torch.autocast(maps[0].device.type, enabled=False):
            return self._forward(maps, image_size, targets, weight)

    def _forward(self, maps, image_size, targets, weight):
        from torchvision.models.detection.image_list import ImageList
        from torchvision.ops import generalized_box_iou_loss

        b = maps[0].shape[0]
        feats = OrderedDict((str(i), m.float()) for i, m in enumerate(maps))
        images = ImageList(maps[0].new_zeros(b, 1, *image_size), [tuple(image_size)] * b)
        tv = [{"boxes": t["boxes"].float(), "labels": t["labels"].long() + 1} for t in targets]
        proposals, rpn = self.rpn(images, feats, tv)
        proposals, matched, labels, _ = self.roi.select_training_samples([p.detach() for p in proposals], tv)
        roi_feats = self.roi.box_roi_pool(
            OrderedDict((k, feats[k]) for k in self.roi_levels), proposals, images.image_sizes
        )
        logits, deltas = self.roi.box_predictor(self.roi.box_head(roi_feats))
        label = torch.cat(labels)
        gt = torch.cat(
            [
                t["boxes"][m.clamp(min=0)] if len(t["boxes"]) else p.new_zeros(p.shape)
                for t, m, p in zip(tv, matched, proposals)
            ]
        )
        rois = torch.cat(proposals)
        loss_cls = F.cross_entropy(logits, label)
        pos = label > 0
        if pos.any():
            d = deltas.reshape(len(label), -1, 4)[pos, label[pos]]
            box = decode_deltas(d, rois[pos])
            loss_box = generalized_box_iou_loss(box, gt[pos], reduction="sum", eps=1e-6) / len(label)
        else:
            loss_box = deltas.sum() * 0
        losses = {
            "rpn_cls": rpn["loss_objectness"] * RCNN_WEIGHTS["rpn_cls"] * weight,
            "rpn_bbox": rpn["loss_rpn_box_reg"] * RCNN_WEIGHTS["rpn_bbox"] * weight,
            "rcnn_cls": loss_cls * RCNN_WEIGHTS["rcnn_cls"] * weight,
            "rcnn_bbox": loss_box * RCNN_WEIGHTS["rcnn_bbox"] * weight,
        }
        ours = torch.where(label > 0, label - 1, torch.full_like(label, self.num_classes))
        split = [len(p) for p in proposals]
        # every image has ROIS_PER_IMAGE unless its proposals ran short: cut all to the fewest, as the
        # official code, after putting each image's positives first so that only negatives are cut
        r = min(split)
        order = [torch.argsort((x == self.num_classes).int(), stable=True)[:r] for x in ours.split(split)]
        pick = lambda t: torch.stack([x[o] for x, o in zip(t.split(split), order)])  # noqa: E731
        return losses, (pick(rois), pick(ours), pick(gt), pick(roi_feats.mean((-1, -2))))
