"""Structured pruning of attention heads and MLP hidden channels: a genuinely smaller timm ViT.

Changes the model: in every block, the least important attention heads (their q/k/v rows of
``qkv`` and their columns of ``proj``) and MLP hidden channels (rows of ``fc1``, columns of ``fc2``)
are removed; ``num_heads``/``attn_dim`` are updated. The dense layers shrink, so the speed-up is
real on any hardware. The per-block shapes are recorded in the manifest, so ``vitkit.load``
rebuilds the smaller model before loading its weights.

Importance (per group of weights that is removed together):

* ``magnitude``: the squared L2 norm of the group's weights and biases (Torch-Pruning's
  ``GroupMagnitudeImportance`` with p=2);
* ``taylor``: first-order Taylor, ``Σ |w · ∂L/∂w|`` over the group with the cross-entropy gradient
  averaged over a few labelled calibration batches (Torch-Pruning's ``GroupTaylorImportance``).

Written here rather than with Torch-Pruning: its ViT support replaces timm's ``Attention.forward``
and needs ``num_heads``/``head_dim`` fixed by hand afterwards (and misses ``attn_dim``), and its
checkpoints pickle the model; slicing four linears per block is short and replayable from the
manifest. Our choices: the same ratio in every block (no global ranking across blocks, so every
block keeps the same width and at least one head); head dimension, embedding dimension, LayerScale
and q/k-norm are untouched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from timm.layers import Mlp
from torch import nn

from vitkit.compress._blocks import all_blocks
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import VitkitAttention, record_transform
from vitkit.registry import AS_IS, Technique, register
from vitkit.train.evaluate import eval_transform

IMPORTANCES = ("magnitude", "taylor")


@dataclass
class StructuredPruneConfig:
    """``heads``/``mlp``: fraction of heads / hidden channels removed in every block, in [0, 1)."""

    heads: float = 0.0
    mlp: float = 0.0
    importance: str = "magnitude"
    blocks: list[dict] = field(default_factory=list)  # resolved per-block shapes (recorded)

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise VitkitError(f"prune {name}: the fraction removed must be in [0, 1), got {value!r}")
    return float(value)


def _removed(n: int, ratio: float) -> int:
    return int(ratio * n + 0.5)


def _pruned_linear(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = lin.weight
    out_f = len(rows) if rows is not None else lin.out_features
    in_f = len(cols) if cols is not None else lin.in_features
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        nw = w if rows is None else w.index_select(0, rows)
        nw = nw if cols is None else nw.index_select(1, cols)
        new.weight.copy_(nw)
        if lin.bias is not None:
            new.bias.copy_(lin.bias if rows is None else lin.bias.index_select(0, rows))
    new.train(lin.training)
    return new


def _pruned_norm(norm: nn.Module, keep: torch.Tensor) -> nn.Module:
    if isinstance(norm, nn.Identity):
        return norm
    if not isinstance(norm, nn.LayerNorm):
        raise VitkitError(f"structured pruning: cannot shrink a {type(norm).__name__} over pruned channels")
    new = type(norm)(len(keep), eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    if norm.elementwise_affine:
        with torch.no_grad():
            new.weight.copy_(norm.weight[keep])
            if norm.bias is not None:
                new.bias.copy_(norm.bias[keep])
    return new.to(norm.weight.device if norm.elementwise_affine else "cpu")


def prune_heads(attn: VitkitAttention, keep: torch.Tensor) -> None:
    """Keep only the heads ``keep`` (sorted indices) of a vitkit attention module, in place."""
    H, D = attn.num_heads, attn.head_dim
    keep = keep.sort().values.to(attn.qkv.weight.device)
    chan = (keep[:, None] * D + torch.arange(D, device=keep.device)).flatten()  # channels of kept heads
    rows = torch.cat([chan + i * H * D for i in range(3)])  # q, k, v blocks of qkv
    attn.qkv = _pruned_linear(attn.qkv, rows, None)
    attn.proj = _pruned_linear(attn.proj, None, chan)
    attn.norm = _pruned_norm(attn.norm, chan)
    if getattr(attn, "gate", None) is not None:
        attn.gate = _pruned_linear(attn.gate, chan, None)
    attn.num_heads = len(keep)
    attn.attn_dim = len(keep) * D


def prune_mlp(mlp: Mlp, keep: torch.Tensor) -> None:
    """Keep only the hidden channels ``keep`` of a timm ``Mlp``, in place."""
    keep = keep.sort().values.to(mlp.fc1.weight.device)
    mlp.fc1 = _pruned_linear(mlp.fc1, keep, None)
    mlp.norm = _pruned_norm(mlp.norm, keep)
    mlp.fc2 = _pruned_linear(mlp.fc2, None, keep)


def _check_block(i: int, blk: nn.Module) -> None:
    if not isinstance(blk.attn, VitkitAttention):
        raise VitkitError(
            f"structured pruning: block {i} attention is {type(blk.attn).__name__}; build the model with vitkit.create_model"
        )
    if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.fc1, nn.Linear):
        raise VitkitError(
            f"structured pruning: block {i} FFN is {type(blk.mlp).__name__}; expected timm's plain Mlp"
        )


def _group_scores(blk: nn.Module, importance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(head scores (H,), hidden-channel scores (hidden,)) for one block."""
    attn, mlp = blk.attn, blk.mlp
    H, D = attn.num_heads, attn.head_dim

    def elem(p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None:
            return None
        if importance == "magnitude":
            return p.detach().float() ** 2
        if p.grad is None:
            raise VitkitError("taylor importance: no gradient reached the weights (is the model frozen?)")
        return (p.detach().float() * p.grad.float()).abs()

    qkv_w = elem(attn.qkv.weight).reshape(3, H, D, -1).sum(dim=(0, 2, 3))
    qkv_b = elem(attn.qkv.bias)
    head = qkv_w + (qkv_b.reshape(3, H, D).sum(dim=(0, 2)) if qkv_b is not None else 0)
    head = head + elem(attn.proj.weight).reshape(-1, H, D).sum(dim=(0, 2))
    ch = elem(mlp.fc1.weight).sum(dim=1) + elem(mlp.fc2.weight).sum(dim=0)
    if mlp.fc1.bias is not None:
        ch = ch + elem(mlp.fc1.bias)
    return head, ch


def taylor_gradients(model: nn.Module, data: ImageDataset, batches: int = 4, batch_size: int = 64) -> None:
    """Leave the cross-entropy gradient, averaged over ``batches`` calibration batches, in ``.grad``."""
    if data.multilabel:
        raise VitkitError("taylor importance uses the cross-entropy of single-label data")
    tf = eval_transform(model)
    was = model.training
    model.eval()
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        n = min(batches, max(1, len(data) // batch_size))
        for b in range(n):
            x = tf.images(data.images[b * batch_size : (b + 1) * batch_size])
            y = data.targets[b * batch_size : (b + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).device)), y.to(x.device))
            (loss / n).backward()
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was)


def _apply_shapes(model: nn.Module, shapes: list[dict], scores: list[tuple] | None) -> None:
    blocks = all_blocks(model)
    if len(shapes) != len(blocks):
        raise VitkitError(
            f"structured pruning: {len(shapes)} recorded block shapes for a model with {len(blocks)} blocks"
        )
    for i, (blk, shape) in enumerate(zip(blocks, shapes)):
        _check_block(i, blk)
        h, m = int(shape["num_heads"]), int(shape["mlp_hidden"])
        if scores is None:  # replay: structure only, weights come from the run
            keep_h, keep_m = torch.arange(h), torch.arange(m)
        else:
            head_s, ch_s = scores[i]
            keep_h, keep_m = head_s.topk(h).indices, ch_s.topk(m).indices
        if h != blk.attn.num_heads:
            prune_heads(blk.attn, keep_h)
        if m != blk.mlp.fc1.out_features:
            prune_mlp(blk.mlp, keep_m)


def apply_structured_prune(
    model: nn.Module,
    cfg: StructuredPruneConfig | dict,
    data: ImageDataset | None = None,
    *,
    calib_batches: int = 4,
    batch_size: int = 64,
) -> nn.Module:
    """Remove ``cfg.heads`` of the heads and ``cfg.mlp`` of the MLP channels of every block (in place).

    ``data`` (labelled images) is needed for ``importance='taylor'``. Records ``prune_structured``.
    """
    cfg = StructuredPruneConfig(**cfg) if isinstance(cfg, dict) else cfg
    heads_r, mlp_r = _ratio(cfg.heads, "heads"), _ratio(cfg.mlp, "mlp")
    if cfg.importance not in IMPORTANCES:
        raise VitkitError(
            f"prune importance: expected one of {', '.join(IMPORTANCES)}, got '{cfg.importance}'"
        )
    blocks = all_blocks(model)
    if not blocks:
        raise VitkitError(
            f"structured pruning needs timm transformer Blocks; {type(model).__name__} has none"
        )
    shapes = []
    for i, blk in enumerate(blocks):
        _check_block(i, blk)
        H, M = blk.attn.num_heads, blk.mlp.fc1.out_features
        h, m = H - _removed(H, heads_r), M - _removed(M, mlp_r)
        if h < 1:
            raise VitkitError(
                f"prune heads={heads_r}: block {i} has {H} heads and would keep none; use a smaller fraction"
            )
        if m < 1:
            raise VitkitError(f"prune mlp={mlp_r}: block {i} would keep no hidden channel of {M}")
        shapes.append({"num_heads": h, "mlp_hidden": m})
    if cfg.importance == "taylor":
        if data is None:
            raise VitkitError("taylor importance needs labelled calibration data")
        taylor_gradients(model, data, calib_batches, batch_size)
    scores = [_group_scores(blk, cfg.importance) for blk in blocks]
    model.zero_grad(set_to_none=True)
    _apply_shapes(model, shapes, scores)
    record_transform(
        model, "prune_structured", StructuredPruneConfig(heads_r, mlp_r, cfg.importance, shapes).to_dict()
    )
    return model


def replay_structured_prune(model: nn.Module, config: dict) -> nn.Module:
    cfg = StructuredPruneConfig(**config)
    _apply_shapes(model, cfg.blocks, None)
    record_transform(model, "prune_structured", cfg.to_dict())
    return model


register(
    Technique(
        name="prune_structured",
        summary="remove the least important attention heads and MLP channels: a smaller dense ViT",
        paper="",  # vitkit's own baseline: magnitude/Taylor importance, no single paper
        config=StructuredPruneConfig,
        replay=replay_structured_prune,
        export=AS_IS,
        family="compress",
        verb="vitkit prune RUN --heads 0.25 --mlp 0.3",
    )
)
