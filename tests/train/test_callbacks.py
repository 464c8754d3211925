"""The loop's callback protocol: which hook runs when, what the context says, resume, recompute."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vitkit.models import create_model
from vitkit.train import Callback, TrainingInterrupted, fit


class _Recorder(Callback):
    def __init__(self):
        self.events: list[tuple] = []

    def on_train_start(self, ctx):
        self.events.append(("train_start", ctx.epoch, ctx.step, ctx.update))

    def on_epoch_start(self, ctx, epoch):
        self.events.append(("epoch_start", epoch, ctx.step))

    def on_step_start(self, ctx):
        self.events.append(("step", ctx.epoch, ctx.step))

    def before_optimizer_step(self, ctx):
        grads = [p.grad for p in ctx.parameters()]
        self.events.append(("before", ctx.update, all(g is not None for g in grads)))

    def after_optimizer_step(self, ctx):
        self.events.append(("after", ctx.update, torch.is_grad_enabled()))

    def on_epoch_end(self, ctx, epoch, row):
        self.events.append(("epoch_end", epoch, row["epoch"]))

    def on_train_end(self, ctx):
        self.events.append(("train_end", ctx.update))


def _data(digits, n=192):
    return dataclasses.replace(digits, train=digits.train.subset(torch.arange(n)))


def test_hooks_run_in_order_with_the_loop_position(digits, quick):
    torch.manual_seed(0)
    rec = _Recorder()
    # 192 images / 64 = 3 steps per epoch; accum 2 -> updates after steps 2 and 3 (the epoch's end)
    fit(create_model("vitkit_nano_p4_16", num_classes=10), _data(digits), quick(epochs=2, accum_steps=2),
        callbacks=[rec], quiet=True)  # fmt: skip
    epoch0 = [
        ("epoch_start", 0, 0),
        ("step", 0, 0), ("step", 0, 1), ("before", 0, True), ("after", 1, False),
        ("step", 0, 2), ("before", 1, True), ("after", 2, False),
        ("epoch_end", 0, 1),
    ]  # fmt: skip
    assert rec.events[0] == ("train_start", 0, 0, 0)
    assert rec.events[1 : 1 + len(epoch0)] == epoch0
    assert rec.events[-2:] == [("epoch_end", 1, 2), ("train_end", 4)]
    assert ("epoch_start", 1, 0) in rec.events  # the step counter starts again at each epoch
    assert sum(e[0] == "after" for e in rec.events) == 4


def test_resume_gives_callbacks_the_restored_position(tmp_path, digits, quick):
    cfg = quick(epochs=2)
    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted):
        fit(create_model("vitkit_nano_p4_16", num_classes=10), _data(digits), cfg, run_dir=tmp_path,
            stop_after_epoch=1, quiet=True)  # fmt: skip
    rec = _Recorder()
    fit(create_model("vitkit_nano_p4_16", num_classes=10), _data(digits), cfg, run_dir=tmp_path,
        resume=True, callbacks=[rec], quiet=True)  # fmt: skip
    assert rec.events[:2] == [("train_start", 1, 0, 3), ("epoch_start", 1, 0)]
    assert rec.events[-1] == ("train_end", 6)


class _Recompute(Callback):
    """Recomputes the update's gradients at unchanged weights: they must equal the loop's own."""

    def __init__(self):
        self.max_diff: list[float] = []
        self.losses: list[float] = []

    def before_optimizer_step(self, ctx):
        first = [p.grad.clone() for p in ctx.parameters()]
        self.losses.append(ctx.recompute_gradients())
        again = [p.grad for p in ctx.parameters()]
        self.max_diff.append(max(float((a - b).abs().max()) for a, b in zip(first, again)))


def test_recompute_gradients_reruns_every_micro_batch_of_the_update(digits, quick):
    torch.manual_seed(0)
    cb = _Recompute()
    fit(create_model("vitkit_nano_p4_16", num_classes=10), _data(digits), quick(epochs=1, accum_steps=2),
        callbacks=[cb], quiet=True)  # fmt: skip
    # two updates (2 micro-batches, then the epoch's last one); accumulated gradients are reproduced
    # only if every micro-batch of the update ran again, scaled as the loop scales them
    assert len(cb.max_diff) == 2 and max(cb.max_diff) < 1e-6
    assert all(0 < loss < 10 for loss in cb.losses)


def test_recompute_gradients_outside_its_hook_raises(digits, quick):
    class Early(Callback):
        def on_step_start(self, ctx):
            ctx.recompute_gradients()

    with pytest.raises(RuntimeError, match="before_optimizer_step"):
        fit(create_model("vitkit_nano_p4_16", num_classes=10), _data(digits, 64), quick(epochs=1),
            callbacks=[Early()], quiet=True)  # fmt: skip


def test_a_callback_must_be_a_callback(digits, quick):
    with pytest.raises(TypeError, match="Callback"):
        fit(create_model("vitkit_nano_p4_16", num_classes=10), _data(digits, 64), quick(epochs=1),
            callbacks=[lambda ctx: None], quiet=True)  # fmt: skip
