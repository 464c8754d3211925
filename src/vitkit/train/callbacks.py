"""Callbacks: what a technique plugs into the one training loop besides its objective.

The objective is the loss (``objective(model, images, targets)``). Everything else a technique does
while training - a schedule that changes the model between steps (EViT's keep rate), an edit of the
weights after every optimizer step (EWA's experts averaging), a different optimizer step (SAM) - is
a :class:`Callback` passed to ``fit(..., callbacks=[...])`` (or ``train_model(..., callbacks=[...])``,
or returned by a ``--transform``'s :class:`~vitkit.registry.TrainTransform`). Callbacks compose: any
objective with any number of callbacks, run in the order given.

The loop calls, on every callback, with the :class:`TrainContext` ``ctx``::

    on_train_start(ctx)                 once, after set-up and resume, before the first epoch
    on_epoch_start(ctx, epoch)          before each epoch (0-based; after the objective's own hook)
    on_step_start(ctx)                  before each batch's forward pass (ctx.step)
    before_optimizer_step(ctx)          the update's gradients are complete; the optimizer steps next
    after_optimizer_step(ctx)           after every optimizer step, under ``torch.no_grad()``, before
                                        the LR schedule and the EMA see it (ctx.update counts from 1)
    on_epoch_end(ctx, epoch, row)       after the epoch's history row is written and checkpointed
    on_train_end(ctx)                   once, when the last epoch is done (not on an interruption)

A callback keeps no state the checkpoint does not: on ``--resume`` it is built again and sees the
restored ``ctx.epoch``, ``ctx.step`` and ``ctx.update``, so everything it computes from them resumes
exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitkit.train.config import TrainConfig


@dataclass
class TrainContext:
    """What a callback sees of the running loop. The loop updates ``epoch``, ``step`` and ``update``;
    callbacks read them and may edit the model's weights or modules' attributes in place."""

    model: nn.Module  # the model being trained, unwrapped (not the DDP or compiled wrapper)
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    steps_per_epoch: int  # batches per epoch in this process
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    extra_modules: list[nn.Module] = field(default_factory=list)  # the objective's trainable modules
    epoch: int = 0  # 0-based, the epoch running
    step: int = 0  # 0-based batch index in the epoch: the batch running
    update: int = 0  # optimizer steps taken so far
    # Set by the loop during before_optimizer_step only (see recompute_gradients).
    _recompute: Callable[[], float] | None = field(default=None, repr=False)

    @property
    def num_epochs(self) -> int:
        return self.cfg.epochs

    @property
    def progress_epochs(self) -> float:
        """Where training is, in epochs: ``epoch + step / steps_per_epoch`` (per-iteration schedules)."""
        return self.epoch + self.step / self.steps_per_epoch

    def parameters(self) -> list[torch.Tensor]:
        """The trainable parameters: the model's and the objective's own modules'."""
        params = [*self.model.parameters(), *(p for m in self.extra_modules for p in m.parameters())]
        return [p for p in params if p.requires_grad]

    def recompute_gradients(self) -> float:
        """Zero the gradients and run this update's forward and backward passes again at the current
        weights (the same micro-batches, precision and gradient synchronisation as the loop's own);
        returns their mean loss. Only inside :meth:`Callback.before_optimizer_step` (SAM uses it)."""
        if self._recompute is None:
            raise RuntimeError("recompute_gradients is only available in before_optimizer_step")
        return self._recompute()


class Callback:
    """Base class: override the hooks you need (every one is a no-op here)."""

    def on_train_start(self, ctx: TrainContext) -> None:
        pass

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        pass

    def on_step_start(self, ctx: TrainContext) -> None:
        pass

    def before_optimizer_step(self, ctx: TrainContext) -> None:
        pass

    def after_optimizer_step(self, ctx: TrainContext) -> None:
        pass

    def on_epoch_end(self, ctx: TrainContext, epoch: int, row: dict[str, Any]) -> None:
        pass

    def on_train_end(self, ctx: TrainContext) -> None:
        pass


class ObjectiveHooks(Callback):
    """The objective's own optional hooks (``on_epoch_start(epoch, num_epochs)``, ``after_update(model,
    update)``) as the first callback, so objectives written before callbacks keep working."""

    def __init__(self, objective: Any):
        self.objective = objective
        # Optional, so objectives written as plain duck-typed classes keep working.
        self._after_update = getattr(objective, "after_update", None)

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        self.objective.on_epoch_start(epoch, ctx.num_epochs)

    def after_optimizer_step(self, ctx: TrainContext) -> None:
        if self._after_update is not None:
            self._after_update(ctx.model, ctx.update)


class CallbackList(Callback):
    """Runs every hook on each callback in order."""

    def __init__(self, callbacks: Sequence[Callback]):
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be vitkit.train.Callback instances, got {type(cb).__name__}")
        self.callbacks = list(callbacks)

    def on_train_start(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_train_start(ctx)

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(ctx, epoch)

    def on_step_start(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_step_start(ctx)

    def before_optimizer_step(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.before_optimizer_step(ctx)

    def after_optimizer_step(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.after_optimizer_step(ctx)

    def on_epoch_end(self, ctx: TrainContext, epoch: int, row: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(ctx, epoch, row)

    def on_train_end(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_train_end(ctx)
