"""Long-tail tools any objective can use: class weights, deferred re-weighting, balanced sampling,
logit adjustment at evaluation.

* Effective-number class weights — Cui et al., "Class-Balanced Loss Based on Effective Number of
  Samples", CVPR 2019: ``w_c = (1 − β) / (1 − β^{n_c})``, normalised so that ``Σ_c w_c = C``
  (the normalisation DeiT-LT and LDAM-DRW use). β = 0.9999 is DeiT-LT's default.
* Deferred re-weighting (DRW) — Cao et al., "Learning Imbalanced Datasets with Label-Distribution-
  Aware Margin Loss", NeurIPS 2019: train unweighted, switch the class weights on from a given
  epoch (DeiT-LT: epoch 1100 of 1200). Weighting is OFF before that epoch — DeiT-LT's repository
  wraps its flag in a tuple so it is always on; that bug is not reproduced.
* Class-balanced sampling (Kang et al., "Decoupling Representation and Classifier for Long-Tailed
  Recognition", ICLR 2020): class c is drawn with probability ∝ n_c^q (q = 0 balanced, q = ½
  square-root, q = 1 instance-balanced = plain shuffling), then a sample uniformly within it.
* Logit adjustment — Menon et al., "Long-tail learning via logit adjustment", ICLR 2021 (post-hoc
  form): ``z_c − τ · log π_c`` with π the training-class prior.

Classes absent from the training counts get weight 0 (they contribute no loss) and prior ε.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vitkit.errors import VitkitError

#: sampler names accepted by TrainConfig.sampler and their exponent q (P(class c) ∝ n_c^q)
SAMPLER_POWERS = {"balanced": 0.0, "sqrt": 0.5}


def _counts(counts: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if c.numel() == 0:
        raise VitkitError(f"{what}: class counts are empty")
    if (c < 0).any() or not torch.isfinite(c).all():
        raise VitkitError(f"{what}: class counts must be non-negative numbers, got {c.tolist()}")
    if c.sum() == 0:
        raise VitkitError(f"{what}: every class count is 0")
    return c


def effective_number_weights(counts: Sequence[int] | torch.Tensor, beta: float = 0.9999) -> torch.Tensor:
    """Cui et al.'s class-balanced weights ``(1−β)/(1−β^n_c)``, scaled to sum to the number of
    classes. ``beta=0`` gives equal weights; β → 1 approaches inverse frequency."""
    if not 0.0 <= beta < 1.0:
        raise VitkitError(f"effective-number beta must be in [0, 1), got {beta}")
    n = _counts(counts, "effective_number_weights")
    present = n > 0
    w = torch.zeros_like(n)
    w[present] = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n[present]))
    w = w / w.sum() * len(n)
    return w.float()


def inverse_frequency_weights(counts: Sequence[int] | torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """``1 / n_c^power`` scaled to sum to the number of classes (power ½: square-root re-weighting)."""
    n = _counts(counts, "inverse_frequency_weights")
    present = n > 0
    w = torch.zeros_like(n)
    w[present] = n[present].pow(-power)
    return (w / w.sum() * len(n)).float()


def drw_start_epoch(epochs: int, start: float | int | None) -> int | None:
    """The 0-based epoch DRW switches on: an int is an epoch index, a float in (0, 1) a fraction of
    training (0.8 → the last 20%). ``None`` means never."""
    if start is None:
        return None
    if isinstance(start, float) and not start.is_integer():
        if not 0.0 < start < 1.0:
            raise VitkitError(f"drw start: a fraction must be in (0, 1), got {start}")
        return min(epochs - 1, math.floor(epochs * start))
    e = int(start)
    if not 0 <= e < epochs:
        raise VitkitError(f"drw start epoch {e} is outside training (0..{epochs - 1})")
    return e


@dataclass
class DeferredReweighting:
    """Class weights that switch on at ``start_epoch`` (0-based) and stay on.

    Call :meth:`set_epoch` from ``Objective.on_epoch_start``; :attr:`weights` is ``None`` before the
    switch, the class weights after it.
    """

    class_weights: torch.Tensor
    start_epoch: int | None
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def active(self) -> bool:
        return self.start_epoch is not None and self.epoch >= self.start_epoch

    @property
    def weights(self) -> torch.Tensor | None:
        return self.class_weights if self.active else None


def sampling_indices(
    labels: torch.Tensor, num_samples: int, generator: torch.Generator, power: float = 0.0
) -> torch.Tensor:
    """``num_samples`` indices drawn with replacement so that class c comes up with probability
    ∝ n_c^power (0: class-balanced, 0.5: square-root, 1: like plain shuffling)."""
    labels = labels.long()
    counts = torch.bincount(labels).double()
    per_class = torch.where(counts > 0, counts.pow(power), torch.zeros_like(counts))
    p = (per_class / counts.clamp(min=1))[labels]
    return torch.multinomial(p.float(), num_samples, replacement=True, generator=generator)


def class_prior(counts: Sequence[int] | torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    n = _counts(counts, "class_prior")
    return (n / n.sum()).clamp(min=eps).float()


def logit_adjust(
    logits: torch.Tensor, counts: Sequence[int] | torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Post-hoc logit adjustment: subtract ``tau · log prior`` (favours tail classes)."""
    prior = class_prior(counts).to(logits.device)
    if prior.numel() != logits.shape[-1]:
        raise VitkitError(
            f"logit adjustment: {prior.numel()} class counts for logits over {logits.shape[-1]} classes"
        )
    return logits - tau * prior.log()
