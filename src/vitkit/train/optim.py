"""Optimizer and LR schedule from timm's factories (AdamW, SGD, Lion, ..., layer-wise LR decay)."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from vitkit.errors import VitkitError
from vitkit.train.config import TrainConfig


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, extra_modules: list[nn.Module] | None = None
) -> torch.optim.Optimizer:
    """timm's optimizer factory over the trainable parameters; weight decay skips norms, biases and
    ``model.no_weight_decay()`` (pos/cls/dist/register tokens). ``extra_modules`` (an objective's
    own trainable modules) join as extra parameter groups under the same rule (no decay on 1-d
    parameters)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise VitkitError("the model has no trainable parameters (everything has requires_grad=False)")
    kwargs = {}
    if cfg.layer_decay is not None:
        if not hasattr(model, "group_matcher"):
            raise VitkitError(
                f"layer_decay needs a model with timm's group_matcher; {type(model).__name__} has none"
            )
        kwargs["layer_decay"] = cfg.layer_decay
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.optimizer,
        lr=cfg.resolved_lr(),
        weight_decay=cfg.resolved_weight_decay(),
        momentum=cfg.momentum,
        **kwargs,
    )
    for module in extra_modules or []:
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for group, wd in ((decay, cfg.resolved_weight_decay()), (no_decay, 0.0)):
            if group:
                optimizer.add_param_group({"params": group, "weight_decay": wd})
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int):
    """A per-update timm schedule (cosine with linear warm-up by default)."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=min(1e-6, cfg.resolved_lr() / 10),
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def lion_from_adamw(lr: float, weight_decay: float, ratio: float = 10.0) -> tuple[float, float]:
    """Lion's rule of thumb (Chen et al. 2023): lr ``ratio`` times smaller, wd ``ratio`` times larger,
    so that lr·wd is unchanged."""
    return lr / ratio, weight_decay * ratio
