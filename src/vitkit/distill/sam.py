"""SAM — Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021 — as an objective wrapper, for training DeiT-LT's "flat" CNN teacher (DeiT-LT trains its
teachers with SAM; the recipe lives outside its repository).

What it changes: nothing in the model; every update takes the gradient at the worst-case nearby
weights ``w + ε̂``, ``ε̂ = ρ·g/‖g‖₂`` (``g`` the gradient at ``w``; ASAM's ``adaptive`` form
``ε̂ = ρ·w²g/‖w g‖₂``, Kwon et al. 2021), and applies it to ``w``.

How it sits in the one loop (our reading; SAM's reference code is a two-call optimizer): the wrapper
computes ``g`` itself with ``torch.autograd.grad``, moves the weights to ``w + ε̂`` and returns the
wrapped objective's loss there; the loop back-propagates it and steps the optimizer, and
``after_update`` subtracts ``ε̂`` again. For SGD/Adam without weight decay this is exactly SAM
(tested to 1e-6); with decoupled weight decay (AdamW) the decay term sees ``w + ε̂`` instead of
``w`` — a difference of ``lr·wd·ε̂`` per step. Each forward runs twice (≈ 2x the cost of a step).
With gradient accumulation every micro-batch is perturbed by its own gradient (the per-micro-batch
"m-sharpness" variant). Under DDP the first gradient is each process's own (as in the SAM paper's
m-sharpness), the second is all-reduced by the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkit.errors import VitkitError
from vitkit.train.objectives import ClassificationObjective, Objective, ObjectiveOutput


class SAMObjective(Objective):
    """Sharpness-aware minimisation around any objective (default: cross-entropy).

    Args:
        inner: the objective whose loss SAM minimises (its ``trainable_modules`` are perturbed too).
        rho: the neighbourhood radius ρ (SAM's default 0.05; ASAM uses larger, e.g. 0.5–2).
        adaptive: ASAM's scale-invariant neighbourhood.
    """

    def __init__(self, inner: Objective | None = None, rho: float = 0.05, adaptive: bool = False):
        if not rho > 0:
            raise VitkitError(f"SAM rho must be > 0, got {rho}")
        self.inner = inner or ClassificationObjective()
        self.rho = rho
        self.adaptive = adaptive
        self.task = self.inner.task
        self._perturbation: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = [*model.parameters(), *(p for m in self.inner.trainable_modules() for p in m.parameters())]
        return [p for p in params if p.requires_grad]

    @torch.no_grad()
    def _restore(self) -> None:
        for p, e in self._perturbation:
            p.sub_(e)
        self._perturbation = []

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        self._restore()  # a previous micro-batch of the same accumulated update
        params = self._params(model)
        clean = self.inner(model, images, targets)
        grads = torch.autograd.grad(clean.loss, params, allow_unused=True)
        with torch.no_grad():
            pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
            scaled = [(p.abs() * g if self.adaptive else g) for p, g in pairs]
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled])
            )
            scale = self.rho / (norm + 1e-12)
            for (p, _), s in zip(pairs, scaled):
                e = (s * p.abs() if self.adaptive else s) * scale.to(s.dtype)
                p.add_(e)
                self._perturbation.append((p, e))
        out = self.inner(model, images, targets)
        logits = clean.logits.detach() if clean.logits is not None else None
        logs = {**out.logs, "sam_clean_loss": float(clean.loss.detach())}
        return ObjectiveOutput(out.loss, logits, logs)

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.inner.on_epoch_start(epoch, num_epochs)

    def after_update(self, model: nn.Module, update: int) -> None:
        self._restore()
        inner_after = getattr(self.inner, "after_update", None)
        if inner_after is not None:
            inner_after(model, update)

    def trainable_modules(self) -> list[nn.Module]:
        return self.inner.trainable_modules()

    def describe(self) -> dict:
        return {"name": "sam", "rho": self.rho, "adaptive": self.adaptive, "inner": self.inner.describe()}
