"""Generic loop hooks used by long-tail and distillation objectives: the class-aware sampler,
mixup switched off from an epoch, and an objective's own trainable modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.data import load_splits
from vitkit.models import create_model
from vitkit.train import ClassificationObjective, Objective, ObjectiveOutput, fit
from vitkit.train.checkpoint import load_checkpoint


class Recorder(ClassificationObjective):
    def __init__(self):
        super().__init__()
        self.epoch = 0
        self.targets: dict[int, list[torch.Tensor]] = {}

    def on_epoch_start(self, epoch, num_epochs):
        self.epoch = epoch

    def __call__(self, model, images, targets):
        self.targets.setdefault(self.epoch, []).append(targets.clone())
        return super().__call__(model, images, targets)


def test_balanced_sampler_draws_classes_equally(quick):
    data = load_splits("digits", longtail=20)
    counts = torch.tensor(data.train.class_counts(), dtype=torch.float)
    assert counts.max() / counts.min() > 15
    rec = Recorder()
    cfg = quick(epochs=2, sampler="balanced", eval_every=10)
    fit(create_model("vitkit_nano_p4_16", num_classes=10), data, cfg, objective=rec, quiet=True)
    drawn = torch.cat([t for ts in rec.targets.values() for t in ts])
    freq = torch.bincount(drawn, minlength=10).float() / len(drawn)
    # plain shuffling would give the head class counts[0]/sum ≈ 0.3 and the tail ≈ 0.015
    assert freq.max() < 0.16 and freq.min() > 0.05, freq


def test_mixup_off_epoch(quick):
    rec = Recorder()
    data = load_splits("digits", train_size=320, val_size=50)
    cfg = quick(epochs=3, mixup=0.8, cutmix=1.0, mixup_off_epoch=2, eval_every=10)
    fit(create_model("vitkit_nano_p4_16", num_classes=10), data, cfg, objective=rec, quiet=True)

    def mixed_fraction(epoch):
        t = torch.cat(rec.targets[epoch])
        return (t.max(1).values < 0.99).float().mean().item()

    assert mixed_fraction(0) > 0.5 and mixed_fraction(1) > 0.5
    assert mixed_fraction(2) == 0.0  # one-hot targets once mixup is off


class WithProjector(Objective):
    """CE plus a trainable linear map that must learn to reproduce the logits' mean (a stand-in
    for a distillation projector): it only trains if the loop hands its parameters to the optimizer."""

    def __init__(self):
        self.proj = nn.Linear(10, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, 5.0)

    def trainable_modules(self):
        return [self.proj]

    def __call__(self, model, images, targets):
        logits = model(images)
        aux = F.mse_loss(self.proj(logits.detach()).squeeze(1), torch.zeros(len(logits)))
        return ObjectiveOutput(F.cross_entropy(logits, targets) + aux, logits)


def test_objective_modules_train_and_resume(quick, tmp_path):
    digits = load_splits("digits", train_size=640, val_size=50)
    obj = WithProjector()
    cfg = quick(epochs=2, lr=1e-2)
    fit(
        create_model("vitkit_nano_p4_16", num_classes=10),
        digits,
        cfg,
        objective=obj,
        run_dir=tmp_path,
        quiet=True,
    )
    assert obj.proj.bias.item() < 4.97  # it moved from 5 toward 0 (it stays at 5.0 if not optimised)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    torch.testing.assert_close(state["objective_modules"][0]["bias"], obj.proj.bias.detach())
    # resume restores the module state before training on
    obj2 = WithProjector()
    fit(
        create_model("vitkit_nano_p4_16", num_classes=10),
        digits,
        quick(epochs=3, lr=1e-2),
        objective=obj2,
        run_dir=tmp_path,
        resume=True,
        quiet=True,
    )
    assert abs(obj2.proj.bias.item()) < abs(obj.proj.bias.item()) + 1e-6
