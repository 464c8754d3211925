import pytest
import torch

from vitkit.analyze.attacks import (
    AttackConfig,
    VitkitAttackWarning,
    ce_loss,
    check_eps,
    fgsm,
    measure_attack,
    pgd,
)
from vitkit.analyze.common import PixelModel
from vitkit.errors import VitkitError


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_the_eps_ball_and_the_image_box(micro, val_pixels, norm, eps):
    x, y = val_pixels[0][:64].clone(), val_pixels[1][:64]  # the fixture is shared: don't edit it
    x[:, :, :2] = 0.0  # pixels on the box's faces must stay inside it
    x[:, :, -2:] = 1.0
    pm = PixelModel(micro)
    xa = pgd(
        ce_loss(pm, y),
        x,
        eps=eps,
        alpha=eps / 3,
        steps=5,
        norm=norm,
        generator=torch.Generator().manual_seed(0),
    )
    d = (xa - x).flatten(1)
    assert xa.min() >= 0 and xa.max() <= 1
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
        assert d.abs().max() > eps / 2  # it moved
    else:
        assert d.norm(dim=1).max() <= eps + 1e-5
        assert d.norm(dim=1).mean() > eps / 2


def test_fgsm_equals_the_closed_form(micro, val_pixels):
    x, y = val_pixels[0][:32], val_pixels[1][:32]
    pm = PixelModel(micro)
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(pm(xr), y, reduction="sum").backward()
    expected = (x + 8 / 255 * xr.grad.sign()).clamp(0, 1)
    assert torch.allclose(fgsm(ce_loss(pm, y), x, 8 / 255), expected, atol=1e-7)


def test_robust_accuracy_pgd_below_fgsm_below_clean(micro, digits):
    data = digits.val
    f = measure_attack(micro, data, AttackConfig(method="fgsm", n=128))
    p = measure_attack(micro, data, AttackConfig(method="pgd", steps=10, n=128))
    assert f.clean_accuracy == p.clean_accuracy > 0.8
    assert p.robust_accuracy <= f.robust_accuracy <= f.clean_accuracy
    assert p.robust_accuracy < p.clean_accuracy - 0.3  # 8/255 breaks an undefended 16-px ViT
    assert p.attack_success_rate == pytest.approx(1 - p.robust_accuracy / p.clean_accuracy)
    assert p.max_linf <= 8 / 255 + 1e-6


def test_eps_in_the_wrong_units_is_refused_or_warned():
    with pytest.raises(VitkitError, match=r"wrong units.*8/255"):
        check_eps(8)
    with pytest.warns(VitkitAttackWarning, match="did you mean"):
        check_eps(0.3)
    with pytest.raises(VitkitError, match="0–255"):
        check_eps(300, "l2", dim=3 * 16 * 16)
    check_eps(8 / 255)  # silent
    with pytest.raises(VitkitError, match="method"):
        AttackConfig(method="cw")
