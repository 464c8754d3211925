"""DeiT-LT — Rangwani et al., "DeiT-LT: Distillation Strikes Back for Vision Transformer Training on
Long-Tailed Datasets", CVPR 2024.

What it changes: nothing in the model beyond DeiT's DIST token; the objective is DeiT's hard
distillation with (1) out-of-distribution distillation — the CNN teacher, trained on the same
long-tailed data, sees the student's strongly augmented batch (RandAugment, mixup/cutmix, random
erasing) resized to its own, lower resolution — and (2) deferred re-weighting of the DIST loss only:
from the DRW epoch on, ``CE(z_dist, argmax z_t)`` is weighted with effective-number class weights
(β = 0.9999). The CLS loss stays unweighted (``weighted_base`` turns the weights on for it too, as
``--weighted-baseloss``). Mixup/cutmix are switched off for the DRW phase (``--no-mixup-drw``,
through the loop's ``mixup_off_epoch``). The CLS head becomes the head-class expert, the DIST head
the tail expert: evaluation reports both and their mean on many/medium/few-shot classes.

Not reproduced: DeiT-LT's repository makes re-weighting always on when no DRW epoch is given (a
flag wrapped in a tuple is always true); here weighting is on only from the DRW epoch. The
SAM/PaCo training of the flat teacher is outside the DeiT-LT repository and is not part of this
objective: train the teacher with ``vitkit train`` (optionally ``--sampler balanced``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from vitkit.distill.deit import DeiTConfig, DeiTObjective, hard_distillation_loss
from vitkit.distill.teacher import Teacher
from vitkit.errors import VitkitError
from vitkit.train.longtail import DeferredReweighting, drw_start_epoch, effective_number_weights

#: DeiT's strong augmentation, which DeiT-LT keeps for the student (TrainConfig fields). DeiT's
#: RandAugment string is rand-m9-mstd0.5-inc1; ``mmax9`` clips the sampled magnitude at 9 instead of
#: 10 because at 10 timm's increasing posterize keeps 0 bits, which Pillow ≥ 10 refuses (ValueError).
STRONG_AUGMENT = {"randaug": "rand-m9-mstd0.5-inc1-mmax9", "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25}


@dataclass
class DeiTLTConfig:
    """``drw``: when re-weighting starts — a fraction of training (0.8: the last 20%, close to
    DeiT-LT's 1100 of 1200 epochs = 0.917) or an epoch index (0-based); ``None``: never.
    ``beta``: effective-number β. ``alpha``: weight of the DIST loss. ``weighted_base``: weight the
    CLS loss too after DRW. ``no_mixup_drw``: mixup/cutmix off during DRW (applied by the runner)."""

    alpha: float = 0.5
    drw: float | int | None = 0.8
    beta: float = 0.9999
    weighted_base: bool = False
    no_mixup_drw: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise VitkitError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta < 1.0:
            raise VitkitError(f"beta must be in [0, 1), got {self.beta}")

    def drw_epoch(self, epochs: int) -> int | None:
        return drw_start_epoch(epochs, self.drw)


class DeiTLTObjective(DeiTObjective):
    """DeiT hard distillation on the DIST token with deferred, effective-number re-weighting.

    Args:
        teacher: the CNN teacher (its input size is DeiT-LT's ``teacher_size``: pass
            ``input_size`` to :func:`~vitkit.distill.teacher.load_teacher` to change it).
        student: a student with a DIST token.
        class_counts: training-set samples per class (weights and many/medium/few-shot groups).
    """

    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        class_counts: list[int],
        cfg: DeiTLTConfig | None = None,
        *,
        label_smoothing: float = 0.0,
    ):
        self.lt = cfg or DeiTLTConfig()
        super().__init__(
            teacher,
            student,
            DeiTConfig(distillation="hard", alpha=self.lt.alpha),
            label_smoothing=label_smoothing,
            class_counts=list(class_counts),
        )
        self.class_weights = effective_number_weights(class_counts, self.lt.beta)
        self.drw = DeferredReweighting(self.class_weights, None)

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.drw.start_epoch = self.lt.drw_epoch(num_epochs)
        self.drw.set_epoch(epoch)

    def distillation_loss(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return hard_distillation_loss(dist_logits, teacher_logits, weight=self.drw.weights)

    def base_loss(self, cls_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.lt.weighted_base and self.drw.active:
            self.base.class_weights = self.class_weights
        else:
            self.base.class_weights = None
        return self.base.compute(cls_logits, targets)

    def describe(self) -> dict:
        return {
            "name": "deit-lt",
            **asdict(self.lt),
            "class_weights": self.class_weights.tolist(),
            **self.teacher.describe(),
        }
