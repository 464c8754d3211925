"""Shared fixtures: real data (digits), tiny models, one trained run reused across tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VITKIT_PROGRESS", "0")


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def digits():
    """Digits train/val split (1,438 / 359 real 8x8 images)."""
    from vitkit.data import load_splits

    return load_splits("digits")


def quick_config(**overrides):
    """A TrainConfig that trains vitkit_nano_p4_16 on digits in a couple of seconds."""
    from vitkit.train import TrainConfig

    base = dict(model="vitkit_nano_p4_16", data="digits", epochs=3, batch_size=64, lr=3e-3, tensorboard=False)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A vitkit_micro_p4_16 trained 20 epochs on digits (about 93-95% val top-1): a real run directory."""
    from vitkit.api import train_model

    out = tmp_path_factory.mktemp("runs") / "micro"
    cfg = quick_config(
        model="vitkit_micro_p4_16", epochs=20, lr=2e-3, warmup_epochs=1, scale_min=0.8, translate=0.1
    )
    train_model(cfg, out, quiet=True)
    return out


@pytest.fixture
def quick():
    return quick_config


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory) -> Path:
    """vitkit_nano_p4_16 MAE-pretrained 8 epochs on digits (mask 0.75, norm_pix_loss): an encoder run."""
    from vitkit.stages.pretrain import pretrain_mae

    out = tmp_path_factory.mktemp("runs") / "mae-nano"
    cfg = quick_config(epochs=8, lr=2e-3, warmup_epochs=1, scale_min=0.5)
    pretrain_mae(cfg, out, quiet=True)
    return out
