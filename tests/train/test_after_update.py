"""The loop's per-update hook: ``Objective.after_update(model, update)`` runs after every optimizer step."""

from __future__ import annotations

import dataclasses

import torch

from vitkit.models import create_model
from vitkit.train import ClassificationObjective, fit


class _ZeroHeadBias(ClassificationObjective):
    """Counts updates and zeroes the head bias after each one (an edit the optimizer would undo)."""

    def __init__(self):
        super().__init__("ce")
        self.updates: list[int] = []
        self.grad_enabled: list[bool] = []

    def after_update(self, model, update):
        self.updates.append(update)
        self.grad_enabled.append(torch.is_grad_enabled())
        model.head.bias.zero_()


def test_after_update_runs_once_per_optimizer_step(digits, quick):
    data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(256)))
    model = create_model("vitkit_nano_p4_16", num_classes=10)
    obj = _ZeroHeadBias()
    cfg = quick(epochs=2, batch_size=64, accum_steps=2)
    fit(model, data, cfg, objective=obj, quiet=True)
    # 256 images / 64 per step = 4 steps per epoch, 2 accumulated per update -> 2 updates per epoch
    assert obj.updates == [1, 2, 3, 4]
    assert not any(obj.grad_enabled)
    # the edit made after the last step is what training returns (a no-op hook would leave a bias)
    assert torch.count_nonzero(model.head.bias) == 0
