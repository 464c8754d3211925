"""Feature distillation: DCT identities, the mimicking losses against hand formulas, the projector's
shapes, G2SD's loss, and a short run where the feature losses must fall."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.fft import dctn

from vitkit.data import load_splits
from vitkit.distill.feature import (
    CrossAttentionProjector,
    G2SDConfig,
    G2SDObjective,
    ScaleKDObjective,
    align_tokens,
    dct2,
    frequency_mimic_loss,
    idct2,
    remove_dc,
    spatial_mimic_loss,
)
from vitkit.distill.teacher import Teacher
from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.train import fit


def test_dct_identities():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 6)
    torch.testing.assert_close(idct2(dct2(x)), x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(dct2(x).numpy(), dctn(x.numpy(), axes=(-2, -1), norm="ortho"), atol=1e-5)
    # zeroing the DC coefficient removes the per-channel spatial mean
    torch.testing.assert_close(remove_dc(x), x - x.mean((-2, -1), keepdim=True), rtol=0, atol=1e-5)


def test_mimic_losses_match_hand_formulas():
    torch.manual_seed(0)
    p, t = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    hand = (
        sum(
            ((p[b, :, i, j] / p[b, :, i, j].norm() - t[b, :, i, j] / t[b, :, i, j].norm()) ** 2).sum()
            for b in range(3)
            for i in range(4)
            for j in range(4)
        )
        / 3
    )
    torch.testing.assert_close(spatial_mimic_loss(p, t), hand)
    pc, tc = p - p.mean((-2, -1), keepdim=True), t - t.mean((-2, -1), keepdim=True)
    torch.testing.assert_close(frequency_mimic_loss(p, t), spatial_mimic_loss(pc, tc), rtol=1e-5, atol=1e-5)
    assert spatial_mimic_loss(t, t).item() < 1e-10 and frequency_mimic_loss(t, t).item() < 1e-8


def test_projector_shapes():
    cap = CrossAttentionProjector(32, 64, student_hw=(4, 4), query_hw=(8, 8), num_heads=8)
    out = cap(torch.randn(2, 32, 4, 4))
    assert out.shape == (2, 64, 64)


def test_g2sd_loss_and_token_alignment():
    torch.manual_seed(0)
    student = create_model("vitkit_nano_p4_16", num_classes=10)  # 1 prefix, 4x4 grid, 32 wide
    teacher_model = create_model(
        "vitkit_micro_distilled_p4_16", num_classes=10, img_size=32
    )  # 2 prefix, 8x8, 64
    obj = G2SDObjective(Teacher(teacher_model), student, G2SDConfig())
    s = torch.randn(2, 17, 32)
    t = torch.randn(2, 66, 64)
    s2, t2 = align_tokens(s, student, t, teacher_model)
    assert s2.shape == (2, 17, 32) and t2.shape == (2, 17, 64)
    torch.testing.assert_close(t2[:, 0], t[:, 0])  # CLS to CLS; the DIST token skipped
    grid = t[:, 2:].transpose(1, 2).reshape(2, 64, 8, 8)
    expect = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(t2[:, 1:], expect)
    got = obj.feature_loss(s2, t2)
    ref = F.smooth_l1_loss(obj.projector(s2), F.layer_norm(t2, (64,)), beta=2.0)
    torch.testing.assert_close(got, ref)
    with pytest.raises(VitkitError, match="not a ViT"):
        G2SDObjective(Teacher(teacher_model), create_model("test_resnet", num_classes=10))


class Logger:
    def __init__(self, objective):
        self.objective = objective
        self.logs: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, model, images, targets):
        out = self.objective(model, images, targets)
        self.logs.append(out.logs)
        return out


@pytest.mark.slow
def test_feature_losses_fall_and_the_teacher_stays_frozen(trained_run, quick):
    from vitkit.runs import load

    data = load_splits("digits", train_size=640, val_size=100)
    teacher = Teacher(load(trained_run))
    before = [p.detach().clone() for p in teacher.parameters()]
    for make in (
        lambda s: G2SDObjective(teacher, s, G2SDConfig(ce_weight=0.0)),
        lambda s: ScaleKDObjective(teacher, s),
    ):
        torch.manual_seed(0)
        student = create_model("vitkit_nano_p4_16", num_classes=10)
        obj = Logger(make(student))
        fit(student, data, quick(epochs=4, lr=3e-3, eval_every=10), objective=obj, quiet=True)
        keys = [k for k in obj.logs[0] if k.endswith("_loss") and k not in ("ce_loss", "kd_loss")]
        for k in keys:
            first = np.mean([log[k] for log in obj.logs[:5]])
            last = np.mean([log[k] for log in obj.logs[-5:]])
            assert last < 0.8 * first, (k, first, last)
    for p, q in zip(before, teacher.parameters()):
        assert q.grad is None and torch.equal(p, q)
