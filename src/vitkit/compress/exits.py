"""LGViT — Xu et al., "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer", ACM MM 2023.

Changes the model: the blocks after which an exit sits become :class:`ExitBlock`s carrying an exit
head (a local-perception conv head early in the network, a global-aggregation attention head on a
strided token grid later). ``model(x)`` is unchanged (the final head); the exit logits are computed
only while someone listens (:func:`collect_exits`, used by the training objectives) or by
:func:`early_exit_forward`, which stops each *sample* at the first exit whose max softmax reaches
the threshold.

Faithful to falcon-xu/LGViT (``highway.py``, ``modeling_highway_deit.py``): the heads
(``conv1_1``: 1x1 conv-GELU-BN, depthwise 3x3-GELU-BN, 1x1 conv-BN, residual; ``conv2_1``: the same
without the depthwise conv; ``GlobalSparseAttn``: MHSA on tokens subsampled with stride 2 or 3 —
strided subsampling, as their ``AvgPool2d(kernel=1)`` is), logits = Linear(mean of head tokens +
cls embedding); stage 1 "alternating_weighted" (odd steps: final head only; even steps:
``(Σ k_i·CE_i + D·CE_final) / (Σ k_i + D)`` with k_i the blocks before exit i); stage 2 with the
backbone frozen: ``(1-α)ΣCE_i + αΣ KD_i`` (KL at T=2, ×T², α=0.3) + 0.01 × heterogeneous feature
distillation (KL over channels between each head's tokens and the last block's patch tokens,
subsampled like the head) + 0.01 × homogeneous distillation (conv heads: MSE to the last conv head's
tokens; attention heads: MSE between channel Gram matrices and the last attention head's).

Our choices: the exit decision is made PER SAMPLE (their ``confidence()`` takes a max over the whole
batch, only right at batch 1); exits are given as "after k blocks" (1..depth-1) and the head kind
follows LGViT's placement by relative depth (< 1/2: conv1_1, < 2/3: conv2_1, < 5/6: attention
stride 2, else stride 3; the stride shrinks when the grid is too small); heads read the block
output before the final norm, as theirs read the encoder layer output; a model without a class
token pools the head tokens only; DeiT's second (distillation) exit classifier is not built (one
classifier on the class token). The entropy exit criterion is not implemented.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from vitkit.compress._blocks import WrappedBlock, parse_int_list, transformer_blocks
from vitkit.data import BatchTransform, ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import num_prefix_tokens, record_transform
from vitkit.registry import AS_IS, Technique, register
from vitkit.train.evaluate import autocast_context, classification_metrics, eval_transform
from vitkit.train.objectives import ClassificationObjective, Objective, ObjectiveOutput

HEAD_KINDS = ("local", "local_light", "global")


# -- heads --------------------------------------------------------------------------------------
def _tokens_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, grid[0], grid[1])


class LocalPerceptionHead(nn.Module):
    """LGViT's ``conv1_1`` (``depthwise=True``) or ``conv2_1`` mixer on the patch grid, residual."""

    def __init__(self, dim: int, grid: tuple[int, int], depthwise: bool = True):
        super().__init__()
        self.grid = tuple(grid)
        self.conv1 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))
        self.dw = (
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.GELU(), nn.BatchNorm2d(dim))
            if depthwise
            else nn.Identity()
        )
        self.conv2 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.dw(self.conv1(_tokens_to_grid(x, self.grid))))
        return y.flatten(2).transpose(1, 2) + x


class GlobalAggregationHead(nn.Module):
    """LGViT's ``GlobalSparseAttn``: multi-head self-attention over the grid subsampled by ``stride``."""

    def __init__(self, dim: int, grid: tuple[int, int], num_heads: int, stride: int):
        super().__init__()
        self.grid, self.stride, self.num_heads = tuple(grid), int(stride), int(num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = _tokens_to_grid(x, self.grid)[:, :, :: self.stride, :: self.stride].flatten(2).transpose(1, 2)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ExitHead(nn.Module):
    """Mixer over the patch tokens, mean-pooled, plus the class embedding, then a linear classifier."""

    def __init__(
        self,
        kind: str,
        dim: int,
        num_classes: int,
        grid: tuple[int, int],
        num_prefix: int,
        has_cls: bool,
        num_heads: int,
        stride: int,
    ):
        super().__init__()
        self.kind, self.num_prefix, self.has_cls = kind, int(num_prefix), bool(has_cls)
        if kind == "global":
            self.mixer: nn.Module = GlobalAggregationHead(dim, grid, num_heads, stride)
        else:
            self.mixer = LocalPerceptionHead(dim, grid, depthwise=kind == "local")
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.mixer(x[:, self.num_prefix :])
        pooled = feats.mean(dim=1)
        if self.has_cls:
            pooled = pooled + x[:, 0]
        return self.classifier(pooled), feats


class ExitBlock(WrappedBlock):
    """A timm ``Block`` with an exit head after it. Its forward is timm's; the head runs only while
    a listener is registered (:func:`collect_exits`)."""

    def __init__(self, block: Block, head: ExitHead, blocks_before: int):
        super().__init__(block)
        self.exit_head = head
        self.blocks_before = int(blocks_before)  # blocks executed when this exit is taken
        self._listeners: dict[int, Any] = {}

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = self.mlp_residual(self.attention_residual(x, attn_mask, is_causal))
        if self._listeners:
            logits, feats = self.exit_head(x)
            for fn in list(self._listeners.values()):
                fn(self, logits, feats)
        return x

    def extra_repr(self) -> str:
        return f"exit after {self.blocks_before} blocks, head={self.exit_head.kind}"


# -- the transform --------------------------------------------------------------------------------
@dataclass
class ExitConfig:
    """``exits``: exit after this many blocks (1..depth-1), e.g. [4, 8] for a 12-block ViT.
    ``heads``: one kind per exit (local | local_light | global); default by relative depth.
    ``strides``: subsampling stride of each global head; default 2 (3 in the last sixth)."""

    exits: list[int] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def default_head(blocks_before: int, depth: int) -> tuple[str, int]:
    f = blocks_before / depth
    if f < 0.5:
        return "local", 1
    if f < 2 / 3:
        return "local_light", 1
    return "global", 2 if f < 5 / 6 else 3


def check_exits(exits: Sequence[int], depth: int) -> list[int]:
    if not exits:
        raise VitkitError(f"exits: give at least one exit, as 'after k blocks' with k in 1..{depth - 1}")
    bad = [k for k in exits if not 1 <= k <= depth - 1]
    if bad:
        raise VitkitError(
            f"exits {bad}: the model has {depth} blocks; an exit goes after k blocks with k in 1..{depth - 1}"
        )
    return sorted(set(int(k) for k in exits))


def _grid(model: nn.Module) -> tuple[int, int]:
    g = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not g:
        raise VitkitError(
            f"exit heads need a patch grid; {type(model).__name__} has no patch_embed.grid_size"
        )
    return int(g[0]), int(g[1])


def apply_exits(model: nn.Module, cfg: ExitConfig | dict) -> nn.Module:
    """Attach LGViT exit heads after the chosen blocks (in place); records ``exits``."""
    cfg = ExitConfig(**cfg) if isinstance(cfg, dict) else cfg
    blocks = transformer_blocks(model, "early exits")
    depth = len(blocks)
    exits = check_exits(parse_int_list(cfg.exits, "exits"), depth)
    heads = list(cfg.heads) or [default_head(k, depth)[0] for k in exits]
    strides = list(cfg.strides) or [default_head(k, depth)[1] for k in exits]
    if len(heads) != len(exits) or len(strides) != len(exits):
        raise VitkitError(
            f"exits: {len(exits)} exits need as many head kinds and strides (got {heads}, {strides})"
        )
    bad = [h for h in heads if h not in HEAD_KINDS]
    if bad:
        raise VitkitError(f"exit heads {bad}: expected one of {', '.join(HEAD_KINDS)}")
    grid = _grid(model)
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise VitkitError("early exits need a classifier model (num_classes > 0)")
    dim = model.embed_dim
    P = num_prefix_tokens(model)
    has_cls = getattr(model, "cls_token", None) is not None
    heads_n = blocks[0].attn.num_heads
    strides = [max(1, min(s, min(grid) // 2)) if h == "global" else 1 for h, s in zip(heads, strides)]
    for k, kind, stride in zip(exits, heads, strides):
        head = ExitHead(kind, dim, num_classes, grid, P, has_cls, heads_n, stride)
        ref = next(blocks[k - 1].parameters())
        blocks[k - 1] = ExitBlock(blocks[k - 1], head.to(ref.device, ref.dtype), k)
    cfg = ExitConfig(exits, heads, strides)
    record_transform(model, "exits", cfg.to_dict())
    return model


def replay_exits(model: nn.Module, config: dict) -> nn.Module:
    return apply_exits(model, ExitConfig(**config))


def exit_blocks(model: nn.Module) -> list[ExitBlock]:
    return [m for m in model.modules() if isinstance(m, ExitBlock)]


def exit_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for b in exit_blocks(model) for p in b.exit_head.parameters()]


# -- listening ------------------------------------------------------------------------------------
@dataclass
class ExitOutputs:
    """What :func:`collect_exits` gathered during one forward: per exit (in depth order) the logits
    and head tokens; ``final_tokens`` is the last block's output (before the final norm)."""

    blocks: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)
    final_tokens: torch.Tensor | None = None


@contextlib.contextmanager
def collect_exits(model: nn.Module, final_tokens: bool = False) -> Iterator[ExitOutputs]:
    """Run exit heads during ``model(x)`` inside the block and collect their outputs.

    Works through wrappers such as DDP (the blocks are found among ``model.modules()``).
    """
    blocks = exit_blocks(model)
    if not blocks:
        raise VitkitError("the model has no exit heads (apply_exits first, or train with --exits)")
    out = ExitOutputs()
    keys: list[tuple[ExitBlock, int]] = []

    def listen(blk: ExitBlock, logits: torch.Tensor, feats: torch.Tensor) -> None:
        out.blocks.append(blk.blocks_before)
        out.logits.append(logits)
        out.features.append(feats)
        out.kinds.append(blk.exit_head.kind)
        stride = getattr(blk.exit_head.mixer, "stride", 1)
        out.strides.append(stride)

    hook = None
    if final_tokens:
        last = [m for m in model.modules() if isinstance(m, Block)][-1]

        def grab(module, inputs, output):
            out.final_tokens = output

        hook = last.register_forward_hook(grab)
    try:
        for i, blk in enumerate(blocks):
            key = id(listen) + i
            blk._listeners[key] = listen
            keys.append((blk, key))
        yield out
    finally:
        for blk, key in keys:
            blk._listeners.pop(key, None)
        if hook is not None:
            hook.remove()


# -- objectives -----------------------------------------------------------------------------------
class _ExitValidation:
    """Per-epoch validation for the exit objectives: the final head and every exit's top-1."""

    def validate(
        self,
        model: nn.Module,
        val: ImageDataset,
        transform: BatchTransform,
        device: torch.device,
        precision: str,
        batch_size: int,
    ) -> dict:
        final, per_exit = all_exit_logits(
            model, val, transform=transform, device=device, batch_size=batch_size
        )
        m = classification_metrics(final, val.targets)
        out = {"val_loss": m["loss"], "val_top1": m["top1"]}
        for k, lg in per_exit.items():
            out[f"val_exit{k}_top1"] = (lg.argmax(1) == val.targets).float().mean().item()
        return out


class ExitEndToEndObjective(_ExitValidation, Objective):
    """LGViT stage 1 ("alternating_weighted"): odd steps train the final head only; even steps the
    blocks-weighted mean of every exit's cross-entropy and the final one."""

    def __init__(self, depth: int, label_smoothing: float = 0.0):
        self.depth = int(depth)
        self.ce = ClassificationObjective("ce", label_smoothing=label_smoothing)
        self.step = 0

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        self.step += 1
        if self.step % 2 == 1:
            logits = model(images)
            loss = self.ce.compute(logits, targets)
            return ObjectiveOutput(loss, logits, {"final_ce": loss.item()})
        with collect_exits(model) as outs:
            logits = model(images)
        total = self.depth * self.ce.compute(logits, targets)
        weight = float(self.depth)
        for k, lg in zip(outs.blocks, outs.logits):
            total = total + k * self.ce.compute(lg, targets)
            weight += k
        loss = total / weight
        return ObjectiveOutput(loss, logits, {"weighted_ce": loss.item()})

    def describe(self) -> dict:
        return {"name": "lgvit_stage1_alternating_weighted", "depth": self.depth}


def _channel_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of softmax over channels, averaged over tokens."""
    return F.kl_div(
        F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1), log_target=True,
        reduction="none",
    ).sum(-1).mean()  # fmt: skip


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2) @ x / x.shape[1]  # (B, C, C): independent of the token count


class ExitDistillObjective(_ExitValidation, Objective):
    """LGViT stage 2 (backbone frozen by the caller): exit heads learn from the labels and from the
    final head (KD), plus heterogeneous and homogeneous feature distillation (see module docstring)."""

    def __init__(
        self,
        grid: tuple[int, int],
        num_prefix: int,
        alpha: float = 0.3,
        temperature: float = 2.0,
        hetero_weight: float = 0.01,
        homo_weight: float = 0.01,
        label_smoothing: float = 0.0,
    ):
        self.grid, self.num_prefix = tuple(grid), int(num_prefix)
        self.alpha, self.T = float(alpha), float(temperature)
        self.hetero_weight, self.homo_weight = float(hetero_weight), float(homo_weight)
        self.ce = ClassificationObjective("ce", label_smoothing=label_smoothing)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        with collect_exits(model, final_tokens=True) as outs:
            final = model(images)
        teacher = final.detach().float()
        T = self.T
        ce = kd = hetero = homo = final.new_zeros(())
        last_tokens = outs.final_tokens.detach()[:, self.num_prefix :]
        last_local = max((i for i, k in enumerate(outs.kinds) if k != "global"), default=None)
        last_global = max((i for i, k in enumerate(outs.kinds) if k == "global"), default=None)
        for i, (lg, feats, kind, stride) in enumerate(
            zip(outs.logits, outs.features, outs.kinds, outs.strides)
        ):
            ce = ce + self.ce.compute(lg, targets)
            kd = kd + F.kl_div(
                F.log_softmax(lg.float() / T, dim=-1), F.log_softmax(teacher / T, dim=-1), log_target=True,
                reduction="batchmean",
            ) * (T * T)  # fmt: skip
            ref = last_tokens
            if stride > 1:
                ref = _tokens_to_grid(ref, self.grid)[:, :, ::stride, ::stride].flatten(2).transpose(1, 2)
            hetero = hetero + _channel_kl(feats, ref)
            if kind != "global" and last_local is not None and i != last_local:
                homo = homo + F.mse_loss(feats.float(), outs.features[last_local].detach().float())
            if kind == "global" and last_global is not None and i != last_global:
                homo = homo + F.mse_loss(
                    _gram(feats.float()), _gram(outs.features[last_global].detach().float())
                )
        loss = (1 - self.alpha) * ce + self.alpha * kd + self.hetero_weight * hetero + self.homo_weight * homo
        logs = {"exit_ce": ce.item(), "exit_kd": kd.item(), "hetero": hetero.item(), "homo": homo.item()}
        return ObjectiveOutput(loss, final, logs)

    def describe(self) -> dict:
        return {
            "name": "lgvit_stage2_self_distillation",
            "alpha": self.alpha,
            "temperature": self.T,
            "hetero_weight": self.hetero_weight,
            "homo_weight": self.homo_weight,
        }


@contextlib.contextmanager
def frozen_backbone(model: nn.Module) -> Iterator[None]:
    """Only the exit heads train inside the block; ``requires_grad`` is restored on exit."""
    saved = {p: p.requires_grad for p in model.parameters()}
    heads = {id(p) for p in exit_head_parameters(model)}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in heads)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


# -- inference ------------------------------------------------------------------------------------
class ExitPath(nn.Module):
    """The deployable graph of one exit: the backbone up to the exit's block, then its exit head.

    Shares its modules with ``model`` (no copy); ``forward(images)`` returns the exit's logits, equal
    to what :func:`collect_exits` reports for that exit during ``model(images)``. Used to export each
    exit as its own ONNX graph (``vitkit export`` on an early-exit run)."""

    def __init__(self, model: nn.Module, blocks_before: int):
        super().__init__()
        found = [
            i
            for i, b in enumerate(model.blocks)
            if isinstance(b, ExitBlock) and b.blocks_before == blocks_before
        ]
        if not found:
            have = [b.blocks_before for b in exit_blocks(model)]
            raise VitkitError(f"the model has no exit after {blocks_before} blocks (exits: {have})")
        self.blocks_before = int(blocks_before)
        self.model = model  # the exported graph holds only what forward touches (blocks after: pruned)
        self.depth = found[0] + 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model  # the embedding as timm's forward_features does it (prefix tokens, pos embed)
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        for blk in list(m.blocks)[: self.depth]:
            x = blk(x)
        return m.blocks[self.depth - 1].exit_head(x)[0]


@dataclass
class EarlyExitResult:
    logits: torch.Tensor  # (B, K): the logits of the exit each sample took (or the final head)
    blocks: torch.Tensor  # (B,) blocks executed per sample


def early_exit_forward(model: nn.Module, images: torch.Tensor, threshold: float) -> EarlyExitResult:
    """Run the backbone block by block; each sample leaves at the first exit whose max softmax
    probability is >= ``threshold`` (per sample: the others continue on a smaller batch).

    ``threshold`` 0 exits everything at the first head; above 1 nothing exits (the final head's
    logits, equal to ``model(images)``).
    """
    blocks = model.blocks
    depth = len(blocks)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    B = x.shape[0]
    active = torch.arange(B, device=x.device)
    logits_out: torch.Tensor | None = None
    executed = torch.full((B,), depth, dtype=torch.long, device=x.device)
    for blk in blocks:
        x = blk(x)
        if isinstance(blk, ExitBlock):
            logits, _ = blk.exit_head(x)
            if logits_out is None:
                logits_out = logits.new_empty(B, logits.shape[-1])
            done = logits.float().softmax(-1).amax(-1) >= threshold
            if bool(done.any()):
                idx = active[done]
                logits_out[idx] = logits[done]
                executed[idx] = blk.blocks_before
                keep = ~done
                x, active = x[keep], active[keep]
                if active.numel() == 0:
                    return EarlyExitResult(logits_out, executed)
    final = model.forward_head(model.norm(x))
    if logits_out is None:
        return EarlyExitResult(final, executed)
    logits_out[active] = final
    return EarlyExitResult(logits_out, executed)


@torch.no_grad()
def all_exit_logits(
    model: nn.Module,
    data: ImageDataset,
    *,
    transform: BatchTransform | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Final logits and every exit's logits (keyed by blocks before the exit) for all of ``data``."""
    transform = transform or eval_transform(model)
    was = model.training
    model.eval()
    finals: list[torch.Tensor] = []
    per: dict[int, list[torch.Tensor]] = {}
    try:
        for i in range(0, len(data), batch_size):
            x = transform.images(data.images[i : i + batch_size]).to(device)
            with collect_exits(model) as outs:
                finals.append(model(x).float().cpu())
            for k, lg in zip(outs.blocks, outs.logits):
                per.setdefault(k, []).append(lg.float().cpu())
    finally:
        model.train(was)
    return torch.cat(finals), {k: torch.cat(v) for k, v in per.items()}


@torch.no_grad()
def evaluate_early_exit(
    model: nn.Module,
    data: ImageDataset,
    threshold: float,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Top-1 with per-sample early exit at ``threshold``, mean executed blocks, exit histogram."""
    if data.multilabel:
        raise VitkitError("early exit by confidence is defined for single-label classification only")
    tf = eval_transform(model)
    was = model.training
    model.eval()
    logits, blocks = [], []
    try:
        for i in range(0, len(data), batch_size):
            x = tf.images(data.images[i : i + batch_size]).to(device)
            with autocast_context(device, precision):
                r = early_exit_forward(model, x, threshold)
            logits.append(r.logits.float().cpu())
            blocks.append(r.blocks.cpu())
    finally:
        model.train(was)
    lg, bl = torch.cat(logits), torch.cat(blocks)
    m = classification_metrics(lg, data.targets)
    depth = len(model.blocks)
    hist = {str(int(k)): int((bl == k).sum()) for k in sorted(set(bl.tolist()))}
    return {
        "threshold": float(threshold),
        "top1": m["top1"],
        "balanced_accuracy": m["balanced_accuracy"],
        "mean_blocks": bl.float().mean().item(),
        "depth": depth,
        "block_fraction": bl.float().mean().item() / depth,
        "exit_histogram": hist,
        "n": len(data),
    }


@torch.no_grad()
def threshold_sweep(
    model: nn.Module,
    data: ImageDataset,
    thresholds: Sequence[float],
    *,
    latency_images: int = 64,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Accuracy, mean executed blocks and batch-1 latency for each threshold, next to the backbone.

    Latency: mean per-image time of :func:`early_exit_forward` at batch 1 over the first
    ``latency_images`` images, median of ``repeats`` rounds, interleaved with the plain model
    (``model(x)``, the same images) so the ratio is measured under the same load.
    """
    model.eval()
    tf = eval_transform(model)
    imgs = tf.images(data.images[:latency_images])

    def per_image(fn) -> float:
        t = time.perf_counter()
        for j in range(len(imgs)):
            fn(imgs[j : j + 1])
        return (time.perf_counter() - t) / len(imgs) * 1e3

    for j in range(min(8, len(imgs))):  # warm-up
        model(imgs[j : j + 1])
    rows = []
    for tau in thresholds:
        row = evaluate_early_exit(model, data, tau)
        ee, base = [], []
        for _ in range(repeats):
            ee.append(per_image(lambda x, tau=tau: early_exit_forward(model, x, tau)))
            base.append(per_image(model))
        row["latency_ms"] = statistics.median(ee)
        row["backbone_latency_ms"] = statistics.median(base)
        row["latency_ratio"] = row["latency_ms"] / row["backbone_latency_ms"]
        row["latency_ratio_spread"] = (
            min(e / b for e, b in zip(ee, base)),
            max(e / b for e, b in zip(ee, base)),
        )
        rows.append(row)
    return rows


register(
    Technique(
        name="exits",
        summary="early-exit heads after chosen blocks; stop when an exit is confident",
        paper='Xu et al., "LGViT: Dynamic Early Exiting for Accelerating Vision Transformer" (2023)',
        config=ExitConfig,
        replay=replay_exits,
        export=AS_IS,
        family="compress",
        verb="vitkit train --exits 4,8",
    )
)
