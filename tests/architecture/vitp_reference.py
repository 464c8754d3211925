"""The official ViT-P logic (sajjad-sh33/ViT-P @ 1596e6f), re-written on plain tensors to check
``vitkit.architecture.vitp`` against:

* ``prepare_tokens_with_masks`` + ``forward_features`` + ``forward`` of
  ``ViT-P/dinov2/models/vision_transformer.py``: ``cls_embeddings(points)`` (a bias-free linear map of
  (row, col)) in place of the class token, the class position embedding repeated for every point
  (``class_pos_embed.repeat(self.n_points, 1)``), patch tokens plus their position embedding, the
  blocks, the norm, ``head`` on the first ``n_points`` tokens. The blocks are the model's own (DINOv2's
  and timm's pre-norm blocks are the same computation); at the native grid no interpolation is done.
* the fusion lines of ``OneFormer/oneformer/oneformer_model.py`` (``in_cls_results`` ... ``mask_cls_result``)
  and ``semantic_inference``, verbatim but for ``self``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def official_point_logits(vit, point_weight: torch.Tensor, images: torch.Tensor, points: torch.Tensor):
    n_points = points.shape[1]
    w = vit.patch_embed.proj.weight
    x = F.conv2d(images, w, vit.patch_embed.proj.bias, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls_tokens = points @ point_weight.T  # nn.Linear(2, D, bias=False)
    x = torch.cat((cls_tokens, x), dim=1)
    pos_embed = vit.pos_embed
    class_pos_embed = pos_embed[:, 0].repeat(n_points, 1)
    x = x + torch.cat((class_pos_embed.unsqueeze(0), pos_embed[:, 1:]), dim=1)
    for blk in vit.blocks:
        x = blk(x)
    x_norm = vit.norm(x)
    return vit.head(x_norm[:, :n_points])


def official_fusion(
    mask_cls_result: torch.Tensor, point_cls_result: torch.Tensor, alpha: float
) -> torch.Tensor:
    in_cls_results = mask_cls_result[..., :-1]
    out_cls_results = point_cls_result
    out_cls_results = out_cls_results.softmax(-1)
    in_cls_results = in_cls_results.softmax(-1)
    cls_results = (in_cls_results ** (1 - alpha) * out_cls_results**alpha).log()
    is_void_prob = F.softmax(mask_cls_result, dim=-1)[..., -1:]
    mask_cls_probs = torch.cat([cls_results.softmax(-1) * (1.0 - is_void_prob), is_void_prob], dim=-1)
    return torch.log(mask_cls_probs + 1e-8)


def official_semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
    mask_pred = mask_pred.sigmoid()
    return torch.einsum("qc,qhw->chw", mask_cls, mask_pred)
