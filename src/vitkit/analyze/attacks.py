"""Adversarial attacks in pixel space: FGSM and PGD (L∞ and L2, random start).

Papers: Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples" (ICLR 2015) —
FGSM; Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR 2018) — PGD.

What it changes: nothing in the model; it measures clean accuracy, robust accuracy (correct under
attack, over all samples) and the attack success rate on the initially correct samples.

Inputs are images in [0, 1] at the model's input size; the model's mean/std is applied inside
:class:`~vitkit.analyze.common.PixelModel`, so ε is in pixel units (8/255, not 8 and not in
normalized units). The attack loop is written here (about 40 lines) rather than taken from
torchattacks: its last release is 3.5.1 (2023-10), it has no way to restrict the perturbation to a
mask (the patch attack) or to maximise a feature loss (the downstream transfer attack), and both
reuse :func:`pgd` below. Gradients are taken with ``torch.autograd.grad`` on the input only, so the
model's ``.grad`` is never touched.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.analyze.common import PixelModel, check_classifier, pixel_batches, subsample
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.progress import track

LossFn = Callable[[torch.Tensor], torch.Tensor]  # x_adv -> per-sample loss to MAXIMISE, shape (B,)

METHODS = ("fgsm", "pgd", "pgd-l2")


class VitkitAttackWarning(UserWarning):
    """An attack setting that is legal but probably not what the user meant."""


@dataclass
class AttackConfig:
    """One attack. ``eps`` and ``alpha`` are in pixel units of images in [0, 1].

    method: ``fgsm`` (one step of size ε), ``pgd`` (L∞) or ``pgd-l2``.
    alpha: step size; default ε/4 for L∞ PGD (the spec's 2/255 at ε = 8/255), 2.5·ε/steps for L2
        (Madry et al.'s rule).
    """

    method: str = "pgd"
    eps: float = 8 / 255
    alpha: float | None = None
    steps: int = 10
    random_start: bool = True
    n: int | None = 256  # images attacked (a fixed random subset); None = all
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise VitkitError(f"attack method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.steps < 1:
            raise VitkitError(f"attack steps must be ≥ 1, got {self.steps}")
        if self.alpha is not None and self.alpha <= 0:
            raise VitkitError(f"attack alpha must be positive, got {self.alpha}")

    @property
    def norm(self) -> str:
        return "l2" if self.method == "pgd-l2" else "linf"

    def step_size(self) -> float:
        if self.alpha is not None:
            return self.alpha
        if self.method == "fgsm":
            return self.eps
        return self.eps / 4 if self.norm == "linf" else 2.5 * self.eps / self.steps


def check_eps(
    eps: float, norm: str = "linf", dim: int | None = None, *, allow_full_box: bool = False
) -> None:
    """Refuse budgets in the wrong units; warn about budgets that are legal but unusually large.

    Pixels are in [0, 1]: an L∞ ε above 1 (say 8) can only be 0–255 units; one above 32/255 is legal
    but probably meant /255. For L2, ε at or above √dim covers the whole image box.
    """
    if not math.isfinite(eps) or eps <= 0:
        raise VitkitError(f"eps must be a positive number, got {eps}")
    if norm == "linf":
        if eps > 1:
            raise VitkitError(
                f"eps={eps:g} is in the wrong units: pixels are in [0, 1], so an L∞ budget must be ≤ 1 "
                f"(did you mean {eps:g}/255 = {eps / 255:.4f}?)"
            )
        if eps > 32 / 255 and not allow_full_box:
            warnings.warn(
                f"eps={eps:g} is {eps * 255:.0f}/255 in pixel units, far above the usual 8/255 "
                f"(did you mean {eps:g}/255 = {eps / 255:.5f}?)",
                VitkitAttackWarning,
                stacklevel=3,
            )
    elif dim is not None and eps >= math.sqrt(dim):
        raise VitkitError(
            f"eps={eps:g} (L2) reaches every image in the [0, 1] box of dimension {dim} (√dim = "
            f"{math.sqrt(dim):.1f}): was it given in 0–255 units?"
        )


def ce_loss(model: nn.Module, targets: torch.Tensor) -> LossFn:
    """Per-sample cross-entropy of ``model`` (fed pixels in [0, 1]) against ``targets``."""
    return lambda x: F.cross_entropy(model(x), targets, reduction="none")


def _normalize_l2(g: torch.Tensor) -> torch.Tensor:
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / n.view(-1, *([1] * (g.ndim - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / n).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def pgd(
    loss_fn: LossFn,
    x: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent of ``loss_fn`` on ``x`` (in [0, 1]) within the ε-ball ∩ [0, 1].

    ``mask`` (broadcastable to ``x``, 0/1) restricts the perturbation to its pixels: every pixel outside
    it stays bit-identical. ``steps=1``, ``alpha=eps``, ``random_start=False`` is FGSM.
    Returns the adversarial images (detached).
    """
    x = x.detach()
    m = None if mask is None else mask.to(x.dtype).expand_as(x)
    delta = torch.zeros_like(x)
    if random_start:
        if norm == "linf":
            delta = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1).to(x.device) * eps
        else:
            # uniform direction, radius uniform in [0, ε] (as Madry et al.'s L2 start)
            d = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            if m is not None:
                d = d * m
            r = torch.rand(len(x), generator=generator, dtype=x.dtype).to(x.device) * eps
            delta = _normalize_l2(d) * r.view(-1, *([1] * (x.ndim - 1)))
    if m is not None:
        delta = delta * m
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(x + delta).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if m is not None:
                grad = grad * m
            step = grad.sign() if norm == "linf" else _normalize_l2(grad)
            delta = _project(delta + alpha * step, eps, norm)
            if m is not None:
                delta = delta * m
            # intersect with the image box: x + δ in [0, 1]
            delta = (x + delta).clamp(0, 1) - x
        delta = delta.detach()
    out = x + delta
    if m is not None:
        # exact: outside the mask the input comes back bit for bit (x + 0.0 == x, but be explicit)
        out = torch.where(m.bool(), out, x)
    return out.detach()


def fgsm(loss_fn: LossFn, x: torch.Tensor, eps: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``clip_[0,1](x + ε·sign ∇_x L)`` (Goodfellow et al. 2015)."""
    return pgd(loss_fn, x, eps=eps, alpha=eps, steps=1, norm="linf", random_start=False, mask=mask)


def attack_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AttackConfig,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adversarial images for one batch; ``model`` takes pixels in [0, 1] (e.g. a PixelModel)."""
    loss = ce_loss(model, y)
    if cfg.method == "fgsm":
        return fgsm(loss, x, cfg.eps, mask=mask)
    return pgd(
        loss,
        x,
        eps=cfg.eps,
        alpha=cfg.step_size(),
        steps=cfg.steps,
        norm=cfg.norm,
        random_start=cfg.random_start,
        mask=mask,
        generator=generator,
    )


@dataclass
class AttackResult:
    """Accuracy under one attack. ``attack_success_rate`` = #(correct → wrong) / #correct."""

    method: str
    config: dict[str, Any]
    n: int
    clean_accuracy: float
    robust_accuracy: float
    attack_success_rate: float
    n_initially_correct: int
    max_linf: float  # largest |δ| seen (a check that the budget held)
    max_l2: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def robustness_counts(
    pixel_model: nn.Module,
    data: ImageDataset,
    make_adv: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    device: str | torch.device,
    description: str,
) -> dict[str, Any]:
    """Run ``make_adv(x[ok], y[ok], batch_index, ok)`` on the initially correct images ``ok`` of every
    batch and count.

    Initially wrong images count as not robust and are not attacked (they cannot be "fooled").
    """
    base = pixel_model.model if isinstance(pixel_model, PixelModel) else pixel_model
    n = correct = robust = 0
    max_linf = max_l2 = 0.0
    batches = pixel_batches(base, data, batch_size, device)
    total = math.ceil(len(data) / batch_size)
    for b, (x, y) in enumerate(track(batches, total=total, description=description, min_items=2)):
        with torch.no_grad():
            ok = pixel_model(x).argmax(1) == y
        n += len(y)
        correct += int(ok.sum())
        if ok.any():
            xa = make_adv(x[ok], y[ok], b, ok)
            d = (xa - x[ok]).flatten(1)
            max_linf = max(max_linf, float(d.abs().max()))
            max_l2 = max(max_l2, float(d.norm(dim=1).max()))
            with torch.no_grad():
                robust += int((pixel_model(xa).argmax(1) == y[ok]).sum())
    return {
        "n": n,
        "correct": correct,
        "robust": robust,
        "clean_accuracy": correct / max(n, 1),
        "robust_accuracy": robust / max(n, 1),
        "attack_success_rate": (correct - robust) / correct if correct else float("nan"),
        "max_linf": max_linf,
        "max_l2": max_l2,
    }


def measure_attack(
    model: nn.Module, data: ImageDataset, cfg: AttackConfig | None = None, device: str | torch.device = "cpu"
) -> AttackResult:
    """Clean and robust accuracy of ``model`` on ``data`` under FGSM / PGD (see :class:`AttackConfig`)."""
    cfg = cfg or AttackConfig()
    check_classifier(model, data, f"attack {cfg.method}")
    model = model.to(device).eval()
    pm = PixelModel(model).to(device)
    c, h, w = pm.mean.shape[1], *_hw(model)
    check_eps(cfg.eps, cfg.norm, dim=c * h * w)
    data = subsample(data, cfg.n, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    counts = robustness_counts(
        pm,
        data,
        lambda x, y, _b, _ok: attack_batch(pm, x, y, cfg, generator=g),
        batch_size=cfg.batch_size,
        device=device,
        description=f"{cfg.method} ε={cfg.eps:.4g}",
    )
    return AttackResult(
        method=cfg.method,
        config={**asdict(cfg), "alpha": cfg.step_size(), "norm": cfg.norm},
        n=counts["n"],
        clean_accuracy=counts["clean_accuracy"],
        robust_accuracy=counts["robust_accuracy"],
        attack_success_rate=counts["attack_success_rate"],
        n_initially_correct=counts["correct"],
        max_linf=counts["max_linf"],
        max_l2=counts["max_l2"],
    )


def _hw(model: nn.Module) -> tuple[int, int]:
    from vitkit.models import model_input_size

    _, h, w = model_input_size(model)
    return h, w
