"""DeiT-LT: DRW of the DIST loss only from the DRW epoch, the teacher on the resized mixed batch, the
student recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.data import load_splits
from vitkit.distill.deit import apply_dist_token
from vitkit.distill.deitlt import DeiTLTConfig, DeiTLTObjective
from vitkit.distill.teacher import Teacher, renormalize
from vitkit.models import create_model
from vitkit.stages.distill import deit_lt_recipe
from vitkit.train import fit
from vitkit.train.longtail import effective_number_weights

COUNTS = [300, 120, 50, 20, 8]


def _student():
    torch.manual_seed(0)
    return apply_dist_token(create_model("vitkit_nano_p4_16", num_classes=5))


def test_drw_weights_only_the_dist_loss_from_the_drw_epoch():
    student = _student()
    teacher = Teacher(create_model("vitkit_nano_p4_16", num_classes=5))
    obj = DeiTLTObjective(teacher, student, COUNTS, DeiTLTConfig(drw=0.8))
    w = effective_number_weights(COUNTS, 0.9999)
    torch.testing.assert_close(obj.class_weights, w)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    t_logits = teacher(x, (0.5,) * 3, (0.5,) * 3)
    cls_logits = torch.randn(16, 5)
    dist_logits = torch.randn(16, 5)
    for epoch in range(10):
        obj.on_epoch_start(epoch, 10)
        got = obj.distillation_loss(dist_logits, t_logits)
        expect = F.cross_entropy(dist_logits, t_logits.argmax(1), weight=w if epoch >= 8 else None)
        torch.testing.assert_close(got, expect)
        # the CLS loss stays plain CE
        torch.testing.assert_close(obj.base_loss(cls_logits, y), F.cross_entropy(cls_logits, y))
    obj = DeiTLTObjective(teacher, student, COUNTS, DeiTLTConfig(drw=None))
    obj.on_epoch_start(9, 10)
    torch.testing.assert_close(
        obj.distillation_loss(dist_logits, t_logits), F.cross_entropy(dist_logits, t_logits.argmax(1))
    )
    obj = DeiTLTObjective(teacher, student, COUNTS, DeiTLTConfig(drw=3, weighted_base=True))
    obj.on_epoch_start(3, 10)
    torch.testing.assert_close(obj.base_loss(cls_logits, y), F.cross_entropy(cls_logits, y, weight=w))


class Recording(nn.Module):
    def __init__(self):
        super().__init__()
        self.pretrained_cfg = {
            "input_size": (3, 8, 8),
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
        }
        self.num_classes = 10
        self.fc = nn.Linear(3, 10)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.fc(x.mean((2, 3)))


class Spy(DeiTLTObjective):
    def __call__(self, model, images, targets):
        self.images = images.clone()
        self.targets = targets.clone()
        return super().__call__(model, images, targets)


def test_teacher_sees_the_mixed_student_batch_at_its_own_size(quick):
    data = load_splits("digits", train_size=128, val_size=20)
    rec = Recording()
    student = apply_dist_token(create_model("vitkit_nano_p4_16", num_classes=10))
    obj = Spy(Teacher(rec), student, data.train.class_counts(), DeiTLTConfig(drw=None))
    cfg = quick(epochs=1, mixup=0.8, cutmix=1.0, batch_size=32, eval_every=10)
    fit(student, data, cfg, objective=obj, quiet=True)
    assert obj.targets.ndim == 2 and (obj.targets.max(1).values < 0.99).any()  # a mixed batch
    seen = rec.seen[-1]
    assert seen.shape == (32, 3, 8, 8)
    expect = renormalize(
        obj.images, (0.5,) * 3, (0.5,) * 3, rec.pretrained_cfg["mean"], rec.pretrained_cfg["std"], (8, 8), 3
    )
    torch.testing.assert_close(seen, expect, rtol=0, atol=1e-5)


def test_recipe_adds_strong_augmentation_unless_set(quick):
    cfg = deit_lt_recipe(quick(epochs=10), DeiTLTConfig(drw=0.8))
    assert cfg.randaug.startswith("rand-m9") and cfg.mixup == 0.8 and cfg.cutmix == 1.0 and cfg.reprob == 0.25
    assert cfg.mixup_off_epoch == 8
    mine = deit_lt_recipe(
        quick(epochs=10, mixup=0.0, randaug=None), DeiTLTConfig(drw=0.8, no_mixup_drw=False)
    )
    assert mine.mixup == 0.0 and mine.randaug is None and mine.cutmix == 1.0 and mine.mixup_off_epoch is None
