"""The one training loop: it learns, resumes bit-exactly, stops cleanly on NaN and Ctrl-C, runs DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from vitkit.api import train_model
from vitkit.errors import NonFiniteLossError, VitkitError
from vitkit.models import create_model
from vitkit.train import (
    ClassificationObjective,
    ObjectiveOutput,
    TrainConfig,
    TrainingInterrupted,
    build_optimizer,
    fit,
    lion_from_adamw,
)
from vitkit.train.checkpoint import load_checkpoint


def _fit(cfg, data, **kw):
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=10)
    return fit(model, data, cfg, quiet=True, **kw)


def test_learns_digits_far_above_chance(digits, quick):
    res = _fit(quick(model="vitkit_micro_p4_16", epochs=6, lr=2e-3), digits)
    assert res.val_metrics["val_top1"] > 0.5  # chance is 0.10; a broken loop stays near it
    assert len(res.history) == 6 and res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_lion_learns(digits, quick):
    res = _fit(quick(model="vitkit_micro_p4_16", optimizer="lion", lr=4e-4, epochs=6), digits)
    assert res.val_metrics["val_top1"] > 0.4


def test_lion_matches_reference_update():
    from timm.optim import Lion

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    ref = p.detach().clone()
    m = torch.zeros(5)
    lr, wd, b1, b2 = 0.01, 0.1, 0.9, 0.99
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    for _ in range(10):
        g = torch.randn(5)
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - lr * wd)
        ref = ref - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    assert (p.detach() - ref).abs().max() < 1e-7
    new_lr, new_wd = lion_from_adamw(1e-3, 0.05)
    assert new_lr * new_wd == pytest.approx(1e-3 * 0.05)


def test_layer_decay_scales_by_depth(quick):
    model = create_model("vitkit_micro_p4_16", num_classes=10)
    opt = build_optimizer(model, quick(layer_decay=0.5, lr=1.0))
    scales = sorted({round(g["lr_scale"], 6) for g in opt.param_groups})
    # 4 blocks + embeddings + head: scales 0.5^5 ... 0.5^0
    assert scales == [round(0.5**k, 6) for k in range(5, -1, -1)]


def _resume_cfg(quick, **kw):
    kw = {"epochs": 4, **kw}
    return quick(model="vitkit_nano_p4_16", ema_decay=0.9, mixup=0.2, randaug="rand-m5-n1",
                 drop_path=0.1, scale_min=0.8, translate=0.1, train_size=400, val_size=100, **kw)  # fmt: skip


def test_resume_after_epoch_is_bit_identical(tmp_path, quick):
    cfg = _resume_cfg(quick)
    full = train_model(cfg, tmp_path / "full", quiet=True)
    with pytest.raises(TrainingInterrupted):
        train_model(cfg, tmp_path / "cut", quiet=True, stop_after_epoch=2)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 2
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # nothing half-written
    resumed = train_model(cfg, tmp_path / "cut", resume=True, quiet=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(tmp_path, quick):
    cfg = _resume_cfg(quick, epochs=2)

    class CtrlCAt(ClassificationObjective):
        """Sends SIGINT to this process at the 4th step, as a user pressing Ctrl-C would."""

        def __init__(self):
            super().__init__("ce")
            self.calls = 0

        def __call__(self, model, images, targets):
            self.calls += 1
            if self.calls == 4:
                os.kill(os.getpid(), signal.SIGINT)
            return super().__call__(model, images, targets)

    full = train_model(cfg, tmp_path / "full", quiet=True)
    with pytest.raises(TrainingInterrupted) as info:
        train_model(cfg, tmp_path / "cut", objective=CtrlCAt(), quiet=True)
    assert info.value.step == 4 and info.value.epoch == 0
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 4)
    resumed = train_model(cfg, tmp_path / "cut", resume=True, quiet=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits, quick):
    class NaNAfter(ClassificationObjective):
        def __init__(self, at):
            super().__init__("ce")
            self.calls, self.at = 0, at

        def __call__(self, model, images, targets):
            self.calls += 1
            out = super().__call__(model, images, targets)
            return ObjectiveOutput(out.loss * float("nan"), out.logits) if self.calls >= self.at else out

    steps = len(digits.train) // 64
    cfg = quick(epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 3") as info:
        train_model(cfg, tmp_path / "r", objective=NaNAfter(steps + 3), quiet=True)
    assert (info.value.epoch, info.value.step) == (2, 3)
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "r" / "model.json").exists()


def test_accumulation_and_clipping_train(digits, quick):
    res = _fit(
        quick(model="vitkit_micro_p4_16", epochs=5, accum_steps=2, batch_size=32, clip_grad=1.0), digits
    )
    assert res.val_metrics["val_top1"] > 0.5


def test_multilabel_training_with_bce():
    from vitkit.data import load_splits

    data = load_splits("mosaic:digits")
    cfg = TrainConfig(model="vitkit_micro_p4_16", data="mosaic:digits", epochs=6, lr=2e-3, tensorboard=False)
    torch.manual_seed(0)
    res = fit(create_model(cfg.model, num_classes=10), data, cfg, quiet=True)
    assert res.val_metrics["val_mean_auroc"] > 0.7  # chance 0.5


def test_bf16_autocast_path_runs(digits, quick):
    res = _fit(quick(precision="bf16", epochs=1, train_size=256, val_size=64), digits)
    assert res.precision == "bf16" and torch.isfinite(torch.tensor(res.history[0]["train_loss"]))


def test_config_errors_are_one_line():
    from vitkit.train import build_config

    with pytest.raises(VitkitError, match=r"^config: unknown field 'epochz'$"):
        build_config(epochz=3)
    with pytest.raises(VitkitError, match=r"field 'lr'"):
        build_config(lr=-1.0)
    with pytest.raises(VitkitError, match=r"unknown optimizer 'adamz'"):
        build_config(optimizer="adamz")
    with pytest.raises(VitkitError, match=r"warmup_epochs"):
        build_config(epochs=2, warmup_epochs=3)


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitkit", "train", "--model", "vitkit_micro_p4_16", "--epochs", "6", "--lr", "0.002",
           "--batch-size", "32", "--warmup-epochs", "1", "--train-size", "1000", "--val-size", "100", "--no-tensorboard", "--quiet", "--threads", "1", "-o", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from vitkit.io import read_json

    metrics = read_json(out / "metrics.json")
    assert metrics["world_size"] == 2
    a, b = metrics["weight_checksums"]
    assert a == b
    assert (out / "model.safetensors").exists() and metrics["top1"] > 0.25  # chance 0.10; measured 0.38
