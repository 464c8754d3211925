import pytest
import torch

from vitkit.analyze.attacks import AttackConfig, attack_batch
from vitkit.analyze.common import PixelModel
from vitkit.analyze.patches import (
    CORRUPTIONS,
    PatchConfig,
    apply_attention_temperature,
    attention_temperature,
    corrupt_patches,
    measure_patch_robustness,
    patch_grid,
    random_patch_mask,
)
from vitkit.models import attention_maps


def test_patch_attack_changes_no_pixel_outside_the_mask_and_fools_the_model(micro, val_pixels):
    x, y = val_pixels
    pm = PixelModel(micro)
    grid = patch_grid(micro)
    assert grid == (4, 4, 4, 4)
    mask = random_patch_mask(len(x), grid, 1, torch.Generator().manual_seed(0))
    assert torch.all(mask.sum((1, 2, 3)) == 16)  # one 4x4 cell per image
    xa = attack_batch(pm, x, y, AttackConfig(method="pgd", eps=1.0, alpha=0.1, steps=10), mask=mask)
    outside = ~mask.bool().expand_as(x)
    assert torch.equal(xa[outside], x[outside])
    assert (xa != x)[~outside].any()
    with torch.no_grad():
        clean = (pm(x).argmax(1) == y).float().mean()
        robust = (pm(xa).argmax(1) == y).float().mean()
    assert robust < clean - 0.3


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_stay_inside_their_patches(val_pixels, name):
    x = val_pixels[0][:16]
    mask = random_patch_mask(len(x), (4, 4, 4, 4), 2, torch.Generator().manual_seed(1))
    xc = corrupt_patches(x, mask, name, 5, torch.Generator().manual_seed(0))
    outside = ~mask.bool().expand_as(x)
    assert torch.equal(xc[outside], x[outside])
    assert (xc != x)[~outside].any()
    assert xc.min() >= 0 and xc.max() <= 1


def test_temperature_one_reproduces_the_model_exactly_and_large_t_flattens_attention(micro, val_pixels):
    x = PixelModel(micro).normalize(val_pixels[0][:16])
    with torch.no_grad():
        ref = micro(x)
        with attention_temperature(micro, 1.0):
            same = micro(x)
        with attention_temperature(micro, 2.0):
            hot = micro(x)
        with attention_temperature(micro, 1e6), attention_maps(micro) as maps:
            micro(x)
        after = micro(x)
    assert torch.equal(same, ref)
    assert not torch.allclose(hot, ref, atol=1e-3)
    assert torch.equal(after, ref)  # hooks removed on exit
    for _, p in maps.items():
        assert torch.allclose(p, torch.full_like(p, 1 / p.shape[-1]), atol=1e-4)


def test_temperature_transform_survives_save_and_load(micro, trained_run, val_pixels, tmp_path):
    import vitkit
    from vitkit.runs import save_model

    x = PixelModel(micro).normalize(val_pixels[0][:8])
    with torch.no_grad(), attention_temperature(micro, 2.0):
        expected = micro(x)
    m = apply_attention_temperature(vitkit.load(trained_run), {"temperature": 2.0})
    save_model(tmp_path / "t2", m, classes=[str(i) for i in range(10)])
    loaded = vitkit.load(tmp_path / "t2")
    assert [t.name for t in loaded.vitkit_manifest.transforms] == ["attention_temperature"]
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-6)


def test_measure_patch_robustness_reports_every_temperature(micro, digits):
    cfg = PatchConfig(corruptions=("gaussian_noise",), patches=(4,), temperatures=(1.0, 2.0), n=64)
    res = measure_patch_robustness(micro, digits.val, cfg)
    clean1 = res.get(temperature=1.0, kind="clean")["accuracy"]
    noisy1 = res.get(temperature=1.0, kind="corruption", patches=4)["accuracy"]
    assert clean1 > 0.8 and noisy1 <= clean1 + 0.05
    assert 0 < res.get(temperature=2.0, kind="clean")["accuracy"] <= 1  # KeyError when missing
    assert len(res.rows) == 4
