"""Issue 25 item 8: what a resumed (or distributed) run records about itself."""

from __future__ import annotations

import os
import signal

import pytest

from vitkit.api import train_model
from vitkit.train import ClassificationObjective, TrainingInterrupted
from vitkit.train.checkpoint import load_checkpoint


def _cfg(quick, **kw):
    return quick(epochs=2, train_size=256, val_size=64, warmup_epochs=0, **kw)


class CtrlCAt(ClassificationObjective):
    """Sends SIGINT to this process at the n-th step, as a user pressing Ctrl-C would."""

    def __init__(self, n: int):
        super().__init__("ce")
        self.calls, self.n = 0, n

    def __call__(self, model, images, targets):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__call__(model, images, targets)


def test_interrupted_epoch_loss_averages_every_step_not_only_the_resumed_ones(tmp_path, quick):
    cfg = _cfg(quick)
    full = train_model(cfg, tmp_path / "full", quiet=True)
    with pytest.raises(TrainingInterrupted):
        train_model(cfg, tmp_path / "cut", objective=CtrlCAt(2), quiet=True)
    partial = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["partial_epoch"]
    assert partial["loss_n"] == 2 and partial["seen"] == 2 * 64
    resumed = train_model(cfg, tmp_path / "cut", resume=True, quiet=True)
    # the same float additions in the same order: equal, not just close
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_train_seconds_sum_over_sessions(tmp_path, quick):
    cfg = _cfg(quick)
    with pytest.raises(TrainingInterrupted):
        train_model(cfg, tmp_path / "r", quiet=True, stop_after_epoch=1)
    first = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["train_seconds"]
    assert first > 0
    run = train_model(cfg, tmp_path / "r", resume=True, quiet=True)
    second = run.history[1]["epoch_seconds"]
    assert run.metrics["train_seconds"] == pytest.approx(first + second, abs=2e-3)
