"""DeiT token distillation — Touvron et al., "Training data-efficient image transformers &
distillation through attention", ICML 2021.

What it changes in the model: a DIST token (one more prefix token, DeiT's position right after CLS)
and a second linear head read from it; in training the student returns ``(cls_logits,
dist_logits)``, otherwise their mean.

* Students: any timm ``VisionTransformerDistilled`` (``deit_*_distilled_*``, the
  ``vitkit_*_distilled_*`` presets) — used as is, through timm's ``set_distilled_training`` — or any
  plain timm ``VisionTransformer`` made distilled by :func:`apply_dist_token` (replayed by
  ``vitkit.load``).
* Loss (``deit:losses.py``): ``L = (1−α)·L_base(z_cls, y) + α·L_dist(z_dist, z_teacher)``;
  hard: ``CE(z_dist, argmax z_teacher)``; soft: ``T²·KL(softmax(z_t/T) ‖ softmax(z_d/T))``
  divided by ``B·C`` (DeiT's ``reduction='sum' / numel``; ``kl_reduction="batchmean"`` divides
  by B only, as timm's ``TokenDistillationTask``). The teacher is frozen, in eval mode, and gets
  the student's (augmented, mixed) batch in its own normalization (:mod:`vitkit.distill.teacher`).
* Evaluation reports the CLS head, the DIST head and their mean, each.

Our reading, where timm has no class for it: :func:`apply_dist_token` stores the DIST token as the
first slot of timm's register-token parameter (``reg_token``), so timm's own ``_pos_embed``,
dynamic-size resampling and ``forward_intermediates`` handle it; ``num_prefix_tokens`` and
``num_reg_tokens`` grow by one, registers keep their slots after it, blocks (LayerScale, q/k-norm)
are untouched. The two heads sit in timm's pooling and head slots: :class:`DistTokenPool` (in
``attn_pool``, wrapping an existing attention pool) hands ``[CLS-path feature, DIST token]`` to
:class:`DistilledHead`. Consequence: ``forward_head(pre_logits=True)`` of a transformed model
returns ``(B, 2, D)`` (both features), where timm's distilled class returns their mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import PatchDropout, trunc_normal_
from timm.layers.pool1d import global_pool_nlc
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitkit.data import BatchTransform, ImageDataset
from vitkit.distill.teacher import Teacher, unwrap
from vitkit.errors import VitkitError
from vitkit.models import model_name, model_normalization, record_transform
from vitkit.registry import AS_IS, Technique, register
from vitkit.train import ClassificationObjective, Objective, ObjectiveOutput
from vitkit.train.evaluate import classification_metrics, predict

HEADS = ("cls", "dist", "mean")


# ---------------------------------------------------------------------------------------------
# The "add a DIST token" transform
# ---------------------------------------------------------------------------------------------
@dataclass
class DistTokenConfig:
    """``init``: ``random`` (DeiT: trunc-normal 0.02 token and head) or ``copy_cls`` (start the DIST
    token, its position embedding and head as copies of the CLS ones: a sensible start for a
    pretrained student)."""

    init: Literal["random", "copy_cls"] = "random"


class DistTokenPool(nn.Module):
    """Sits in timm's ``attn_pool`` slot and returns ``(B, 2, D)``: the model's own pooled feature
    (CLS token, average, or the attention pool it wraps) and the DIST token."""

    def __init__(
        self,
        pool_type: str,
        num_prefix_tokens: int,
        dist_index: int,
        include_prefix: bool,
        inner: nn.Module | None = None,
    ):
        super().__init__()
        self.pool_type = pool_type
        self.num_prefix_tokens = num_prefix_tokens
        self.dist_index = dist_index
        self.include_prefix = include_prefix
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            feat = self.inner(x if self.include_prefix else x[:, self.num_prefix_tokens :])
        else:
            feat = global_pool_nlc(
                x,
                pool_type=self.pool_type,
                num_prefix_tokens=self.num_prefix_tokens,
                reduce_include_prefix=self.include_prefix,
            )
        return torch.stack([feat, x[:, self.dist_index]], dim=1)


class DistilledHead(nn.Module):
    """The CLS head and the DIST head over ``(B, 2, D)``; like timm's distilled ViT it returns
    ``(cls, dist)`` when ``distilled_training`` and in training mode, their mean otherwise."""

    def __init__(self, head: nn.Module, head_dist: nn.Module):
        super().__init__()
        self.head = head
        self.head_dist = head_dist
        self.distilled_training = False

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(x[:, 0]), self.head_dist(x[:, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        cls, dist = self.both(x)
        if self.distilled_training and self.training:
            return cls, dist
        return (cls + dist) / 2


def has_dist_token(model: nn.Module) -> bool:
    m = unwrap(model)
    return isinstance(m, VisionTransformerDistilled) or isinstance(getattr(m, "head", None), DistilledHead)


def apply_dist_token(model: nn.Module, cfg: DistTokenConfig | dict | None = None) -> nn.Module:
    """Make a plain timm ``VisionTransformer`` a DeiT student: one more prefix token (DIST, right
    after CLS) and a DIST head. In place; recorded in the manifest; ``vitkit.load`` replays it."""
    cfg = DistTokenConfig(**cfg) if isinstance(cfg, dict) else (cfg or DistTokenConfig())
    if cfg.init not in ("random", "copy_cls"):
        raise VitkitError(f"dist_token init must be 'random' or 'copy_cls', got {cfg.init!r}")
    name = model_name(model)
    if has_dist_token(model):
        raise VitkitError(f"model '{name}' already has a DIST token")
    if not isinstance(model, VisionTransformer):
        raise VitkitError(
            f"cannot add a DIST token to '{name}' ({type(model).__name__}): it needs a timm VisionTransformer"
        )
    if not model.global_pool:
        raise VitkitError(f"cannot add a DIST token to '{name}': it has no pooled head (global_pool='')")
    if not isinstance(model.head, nn.Linear):
        raise VitkitError(f"cannot add a DIST token to '{name}': it has no classifier head (num_classes=0?)")
    ref = model.head.weight
    dd = {"device": ref.device, "dtype": ref.dtype}
    dim = model.embed_dim
    dist_index = 1 if model.cls_token is not None else 0
    copy = cfg.init == "copy_cls" and model.cls_token is not None

    token = (
        model.cls_token.detach().clone() if copy else trunc_normal_(torch.empty(1, 1, dim, **dd), std=0.02)
    )
    old_reg = model.reg_token
    model.reg_token = nn.Parameter(token if old_reg is None else torch.cat([token, old_reg.detach()], 1))
    model.num_reg_tokens += 1
    model.num_prefix_tokens += 1

    if model.pos_embed is not None and not model.no_embed_class:
        pe = model.pos_embed.detach()
        row = pe[:, :1].clone() if copy else trunc_normal_(torch.empty(1, 1, dim, **dd), std=0.02)
        model.pos_embed = nn.Parameter(torch.cat([pe[:, :dist_index], row, pe[:, dist_index:]], 1))
    if isinstance(model.patch_drop, PatchDropout):
        model.patch_drop.num_prefix_tokens = model.num_prefix_tokens

    model.attn_pool = DistTokenPool(
        model.global_pool, model.num_prefix_tokens, dist_index, model.pool_include_prefix, model.attn_pool
    )
    model.pool_include_prefix = True  # the pool sees the whole sequence, the DIST token included
    head_dist = nn.Linear(dim, model.num_classes, **dd)
    if copy:
        head_dist.load_state_dict(model.head.state_dict())
    else:
        trunc_normal_(head_dist.weight, std=0.02)
        nn.init.zeros_(head_dist.bias)
    model.head = DistilledHead(model.head, head_dist)
    record_transform(model, "dist_token", asdict(cfg))
    return model


def replay_dist_token(model: nn.Module, config: dict) -> nn.Module:
    """Registry replay: the same structure (values come from the run's weights)."""
    return apply_dist_token(model, DistTokenConfig(**config))


def set_distilled_training(model: nn.Module, enable: bool = True) -> None:
    """Switch the student to return ``(cls, dist)`` in training (timm's distilled class or ours)."""
    m = unwrap(model)
    if isinstance(m, VisionTransformerDistilled):
        m.set_distilled_training(enable)
    elif isinstance(getattr(m, "head", None), DistilledHead):
        m.head.distilled_training = enable
    else:
        raise no_dist_token_error(m)


def no_dist_token_error(model: nn.Module) -> VitkitError:
    name = model_name(model)
    return VitkitError(
        f"student '{name}' has no DIST token, which DeiT distillation needs: use a *_distilled_* model "
        f"(e.g. vitkit_tiny_distilled_p4_32), or add one with --add-dist-token (vitkit.distill.apply_dist_token)"
    )


def head_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS-head and DIST-head logits of a distilled student (any mode)."""
    m = unwrap(model)
    if isinstance(m, VisionTransformerDistilled):
        f = m.forward_features(images)
        return m.head(m.head_drop(f[:, 0])), m.head_dist(m.head_drop(f[:, 1]))
    if isinstance(getattr(m, "head", None), DistilledHead):
        f = m.forward_features(images)
        pooled = m.head_drop(m.fc_norm(m.pool(f)))
        return m.head.both(pooled)
    raise no_dist_token_error(m)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def soft_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 1.0,
    reduction: Literal["deit", "batchmean"] = "deit",
) -> torch.Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` summed, divided by ``B·C`` (DeiT) or ``B``."""
    s = F.log_softmax(student_logits.float() / tau, dim=-1)
    t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl = F.kl_div(s, t, reduction="sum", log_target=True) * (tau * tau)
    if reduction == "deit":
        return kl / student_logits.numel()
    if reduction == "batchmean":
        return kl / student_logits.shape[0]
    raise ValueError(f"reduction must be 'deit' or 'batchmean', got {reduction!r}")


def hard_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``CE(z_s, argmax z_t)``, optionally class-weighted (DeiT-LT's DRW)."""
    w = weight.to(student_logits.device) if weight is not None else None
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(-1), weight=w)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------
@dataclass
class DeiTConfig:
    """``distillation``: hard (DeiT's best) or soft; ``alpha``: weight of the distillation loss;
    ``tau``: soft-distillation temperature; ``kl_reduction``: ``deit`` (÷B·C) or ``batchmean`` (÷B)."""

    distillation: Literal["hard", "soft"] = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    kl_reduction: Literal["deit", "batchmean"] = "deit"

    def __post_init__(self) -> None:
        if self.distillation not in ("hard", "soft"):
            raise VitkitError(f"distillation must be 'hard' or 'soft', got {self.distillation!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise VitkitError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.tau <= 0:
            raise VitkitError(f"tau must be positive, got {self.tau}")
        if self.kl_reduction not in ("deit", "batchmean"):
            raise VitkitError(f"kl_reduction must be 'deit' or 'batchmean', got {self.kl_reduction!r}")


class DeiTObjective(Objective):
    """``(1−α)·L_base(z_cls, y) + α·L_dist(z_dist, teacher)`` for a student with a DIST token.

    Args:
        teacher: a :class:`~vitkit.distill.teacher.Teacher` (frozen, own normalization and size).
        student: the student model (for its normalization; it is also switched to distilled training).
        cfg: :class:`DeiTConfig`.
        label_smoothing: of the base CE on hard labels (mixup/cutmix targets arrive smoothed).
        class_counts: training counts, for many/medium/few-shot accuracy per head in validation.
    """

    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        cfg: DeiTConfig | None = None,
        *,
        label_smoothing: float = 0.0,
        class_counts: list[int] | None = None,
    ):
        if not has_dist_token(student):
            raise no_dist_token_error(unwrap(student))
        self.teacher = teacher
        self.cfg = cfg or DeiTConfig()
        self.student_mean, self.student_std = model_normalization(unwrap(student))
        self.base = ClassificationObjective("ce", label_smoothing=label_smoothing)
        self.class_counts = class_counts
        set_distilled_training(student, True)

    # pieces a subclass (DeiT-LT) re-weights
    def base_loss(self, cls_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.base.compute(cls_logits, targets)

    def distillation_loss(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.distillation == "hard":
            return hard_distillation_loss(dist_logits, teacher_logits)
        return soft_distillation_loss(dist_logits, teacher_logits, self.cfg.tau, self.cfg.kl_reduction)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        if next(self.teacher.parameters()).device != images.device:
            self.teacher.to(images.device)
        return self.teacher(images, self.student_mean, self.student_std)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        set_distilled_training(model, True)
        out = model(images)
        if not isinstance(out, tuple):
            raise VitkitError(
                "the student returned one output in training: it is not in distilled-training mode"
            )
        cls_logits, dist_logits = out
        base = self.base_loss(cls_logits, targets)
        dist = self.distillation_loss(dist_logits, self.teacher_logits(images))
        a = self.cfg.alpha
        loss = (1 - a) * base + a * dist
        logs = {"base_loss": base.item(), "distillation_loss": dist.item()}
        return ObjectiveOutput(loss, (cls_logits + dist_logits) / 2, logs)

    def validate(
        self,
        model: nn.Module,
        val_data: ImageDataset,
        transform: BatchTransform,
        device: torch.device,
        precision: str,
        batch_size: int,
    ) -> dict[str, Any]:
        """Per-epoch validation of the mean, CLS and DIST heads (many/medium/few-shot when counts are known)."""
        per = evaluate_heads(
            model,
            val_data,
            class_counts=self.class_counts,
            batch_size=batch_size,
            device=device,
            precision=precision,
            transform=transform,
        )
        row: dict[str, Any] = {
            "val_loss": per["mean"]["loss"],
            "val_top1": per["mean"]["top1"],
            "val_balanced_accuracy": per["mean"]["balanced_accuracy"],
        }
        for h in ("cls", "dist"):
            row[f"val_top1_{h}"] = per[h]["top1"]
        if self.class_counts is not None:
            for h in HEADS:
                for g in ("many", "medium", "few"):
                    row[f"val_{g}_shot_{h}"] = per[h].get(f"{g}_shot_accuracy")
        return row

    def describe(self) -> dict:
        return {"name": "deit", **asdict(self.cfg), **self.teacher.describe()}


# ---------------------------------------------------------------------------------------------
# Evaluation of the two heads
# ---------------------------------------------------------------------------------------------
def evaluate_heads(
    model: nn.Module,
    data: ImageDataset,
    *,
    class_counts: list[int] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    transform: BatchTransform | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
    teacher: Teacher | None = None,
) -> dict[str, dict]:
    """Classification metrics of the CLS head, the DIST head and their mean (``{"cls", "dist",
    "mean"}``), from one pass over ``data``. With a ``teacher``, each head's agreement with it."""
    student = unwrap(model)
    mean, std = model_normalization(student)
    if teacher is not None:
        teacher.to(device)

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        cls, dist = head_logits(m, x)
        outs = [cls, dist]
        if teacher is not None:
            outs.append(teacher(x, mean, std))
        return torch.stack([o.float() for o in outs], dim=1)

    logits = predict(
        student,
        data,
        batch_size=batch_size,
        device=device,
        precision=precision,
        transform=transform,
        forward=forward,
    )
    by_head = {"cls": logits[:, 0], "dist": logits[:, 1], "mean": (logits[:, 0] + logits[:, 1]) / 2}
    out = {}
    for h, z in by_head.items():
        m = classification_metrics(
            z,
            data.targets,
            class_counts=class_counts,
            many_threshold=many_threshold,
            few_threshold=few_threshold,
        )
        if teacher is not None:
            m["teacher_agreement"] = (z.argmax(1) == logits[:, 2].argmax(1)).float().mean().item()
        out[h] = m
    if teacher is not None:
        out["teacher"] = classification_metrics(
            logits[:, 2],
            data.targets,
            class_counts=class_counts,
            many_threshold=many_threshold,
            few_threshold=few_threshold,
        )
    return out


register(
    Technique(
        name="dist_token",
        summary="a distillation token and head added to any ViT (eval: mean of both heads)",
        paper='Touvron et al., "Training data-efficient image transformers & distillation through attention" (2021)',
        config=DistTokenConfig,
        replay=replay_dist_token,
        export=AS_IS,
        family="distill",
        verb="vitkit distill --add-dist-token",
    )
)
