"""Objectives: a loss over the model's outputs and a batch, plugged into the one training loop.

An objective runs the forward pass itself (``model(images)``) so that techniques with special
outputs (distillation tokens, MAE reconstructions, exit heads) need no second loop. Techniques
subclass :class:`Objective`; the loop calls ``on_epoch_start`` before every epoch and ``after_update``
after every optimizer step. Work that is not part of the loss (schedules that change the model,
weight edits after each update, another optimizer step) is a :class:`vitkit.train.Callback`, which
composes with any objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    logits: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)


class Objective:
    """Base class: ``__call__(model, images, targets) -> ObjectiveOutput``."""

    #: "multiclass", "multilabel" or "none" (self-supervised): how the loop validates.
    task: str = "multiclass"

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Called before each epoch (0-based): schedules such as deferred re-weighting live here."""

    def after_update(self, model: nn.Module, update: int) -> None:
        """Called after every optimizer step (``update`` counts from 1), under ``torch.no_grad()``,
        with the unwrapped model (not DDP), before the EMA sees the new weights. Per-iteration weight
        edits live here (e.g. experts weights averaging); under DDP every process runs it alike."""

    def trainable_modules(self) -> list[nn.Module]:
        """Modules the objective owns and trains along with the model (feature-distillation
        projectors, ...): the loop moves them to the device, adds their parameters to the optimizer
        and keeps their state in the checkpoint. They are not part of the saved model."""
        return []

    def describe(self) -> dict:
        return {"name": type(self).__name__}


class ClassificationObjective(Objective):
    """Cross-entropy (hard labels, with label smoothing and optional class weights), soft-target
    cross-entropy (mixup/cutmix targets), or BCE with logits (multi-label)."""

    def __init__(
        self, loss: str = "ce", label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None
    ):
        if loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {loss!r}")
        self.loss = loss
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights
        self.task = "multilabel" if loss == "bce" else "multiclass"

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        logits = model(images)
        return ObjectiveOutput(self.compute(logits, targets), logits)

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=w)
        if targets.ndim == 2:  # soft targets from mixup/cutmix (smoothing already folded in)
            logp = F.log_softmax(logits, dim=-1)
            per = -(targets * logp)
            if w is not None:
                per = per * w
            return per.sum(-1).mean()
        return F.cross_entropy(logits, targets, weight=w, label_smoothing=self.label_smoothing)

    def describe(self) -> dict:
        return {
            "name": "classification",
            "loss": self.loss,
            "label_smoothing": self.label_smoothing,
            "class_weights": None if self.class_weights is None else self.class_weights.tolist(),
        }
