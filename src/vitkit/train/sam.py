"""SAM — Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021 — as a wrapper of the optimizer step, for any objective and any optimizer. DeiT-LT trains
its "flat" CNN teachers with it (the recipe lives outside its repository).

What it changes: nothing in the model; every update takes the gradient at the worst-case nearby
weights ``w + ε̂``, ``ε̂ = ρ·g/‖g‖₂`` (``g`` the gradient at ``w``), and the optimizer applies it to
``w``. ``adaptive=True`` is ASAM's scale-invariant neighbourhood, ``ε̂ = ρ·w²g/‖w g‖₂`` (Kwon et
al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
Networks", ICML 2021).

How it sits in the one loop (the two-step form of SAM's reference optimizer): the loop computes
``g`` as always (its forward/backward passes over the update's micro-batches, DDP's all-reduce
included); in :meth:`SAM.before_optimizer_step` the weights move to ``w + ε̂`` (:meth:`SAM.ascend`),
the loop recomputes the update's gradients there (``ctx.recompute_gradients()``: the same
micro-batches), and the weights move back to ``w`` (:meth:`SAM.descend`); then the run's own
optimizer steps from ``w`` with that gradient, after the run's gradient clipping, with its weight
decay and LR schedule. So it is exact SAM for every optimizer (AdamW's decoupled decay sees ``w``).
Each update costs two forward/backward passes. With gradient accumulation ``ε̂`` comes from the
whole update's gradient; under DDP from the all-reduced one (SAM's m-sharpness variants, per
micro-batch or per process, are not implemented). The training loss in history.csv is the loss at
``w``; :attr:`SAM.perturbed_loss` holds the last update's loss at ``w + ε̂``.

Use: ``fit(..., callbacks=[SAM(rho=0.05)])`` or ``train_model(..., callbacks=[SAM(rho=0.05)])``.
"""

from __future__ import annotations

import torch

from vitkit.errors import VitkitError
from vitkit.train.callbacks import Callback, TrainContext


class SAM(Callback):
    """Sharpness-aware minimisation around the run's optimizer step.

    Args:
        rho: the neighbourhood radius ρ (SAM's default 0.05; ASAM uses larger, e.g. 0.5–2).
        adaptive: ASAM's scale-invariant neighbourhood.
    """

    def __init__(self, rho: float = 0.05, adaptive: bool = False):
        if not rho > 0:
            raise VitkitError(f"SAM rho must be > 0, got {rho}")
        self.rho = rho
        self.adaptive = adaptive
        self.perturbed_loss: float | None = None
        self._perturbation: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before_optimizer_step(self, ctx: TrainContext) -> None:
        self.ascend(ctx.parameters())
        try:
            self.perturbed_loss = ctx.recompute_gradients()
        finally:
            self.descend()

    @torch.no_grad()
    def ascend(self, params: list[torch.Tensor]) -> None:
        """Move ``params`` to ``w + ε̂`` from their current gradients (kept until :meth:`descend`)."""
        pairs = [(p, p.grad) for p in params if p.grad is not None]
        if not pairs:
            return
        scaled = [(p.abs() * g if self.adaptive else g) for p, g in pairs]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled]))
        scale = self.rho / (norm + 1e-12)
        for (p, _), s in zip(pairs, scaled):
            e = (s * p.abs() if self.adaptive else s) * scale.to(s.dtype)
            p.add_(e)
            self._perturbation.append((p, e))

    @torch.no_grad()
    def descend(self) -> None:
        """Move the parameters back to ``w`` (subtract the ``ε̂`` :meth:`ascend` added)."""
        for p, e in self._perturbation:
            p.sub_(e)
        self._perturbation = []

    def describe(self) -> dict:
        return {"name": "sam", "rho": self.rho, "adaptive": self.adaptive}
