"""Compressed patch stem: the promised token count, position-embedding resampling, GDN, save/load,
training on real data and bad input."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vitkit.architecture.stem import GDN, apply_stem, stem_token_count
from vitkit.errors import VitkitError
from vitkit.models import create_model, model_input_size


@pytest.mark.parametrize(
    ("name", "img", "compression", "tokens"),
    [
        ("vitkit_micro_p4_16", 16, 2, 4),  # 16 -> 4 patch tokens
        ("vitkit_tiny_distilled_p4_32", 32, 2, 16),  # 64 -> 16, two prefix tokens
        ("vitkit_nano_p4_16", 16, 4, 1),
        ("vit_tiny_patch16_224", 64, 2, 4),  # patch 16: CompressAI's four-conv encoder + 2x2 patch conv
    ],
)
def test_stem_produces_the_promised_token_count(name, img, compression, tokens):
    m = create_model(name, num_classes=10, img_size=img)
    before = m.patch_embed.num_patches
    prefix = m.num_prefix_tokens
    apply_stem(m, {"compression": compression})
    assert (
        m.patch_embed.num_patches
        == tokens
        == stem_token_count(img, m.patch_embed.feat_ratio() // compression, compression)
    )
    assert before == tokens * compression**2
    out = m.eval().forward_features(torch.randn(2, 3, img, img))
    assert out.shape[1] == prefix + tokens
    assert model_input_size(m) == (3, img, img)
    assert m(torch.randn(2, 3, img, img)).shape[0] == 2


def test_position_embedding_is_resampled_and_prefix_entries_kept():
    m = create_model("vitkit_tiny_distilled_p4_32", num_classes=10)
    old = m.pos_embed.detach().clone()
    apply_stem(m, {"compression": 2})
    assert m.pos_embed.shape == (1, 2 + 16, 192)
    torch.testing.assert_close(m.pos_embed[:, :2], old[:, :2])
    want = resample_abs_pos_embed(old, [4, 4], [8, 8], num_prefix_tokens=2)
    torch.testing.assert_close(m.pos_embed, want)
    assert m.pos_embed.requires_grad


def test_gdn_matches_its_formula():
    g = GDN(3)
    with torch.no_grad():
        g.gamma.copy_(torch.rand(3, 3))
        g.beta.copy_(torch.rand(3) + 0.5)
    x = torch.randn(2, 3, 5, 5)
    norm = g.beta[None, :, None, None] + torch.einsum("ij,bjhw->bihw", g.gamma, x * x)
    torch.testing.assert_close(g(x), x / norm.sqrt(), atol=1e-6, rtol=1e-5)


def test_save_load_rebuilds_the_stem(tmp_path):
    from vitkit.runs import load, save_model

    m = apply_stem(create_model("vitkit_micro_p4_16", num_classes=10), {"compression": 2, "channels": 24})
    m.eval()
    save_model(tmp_path, m, classes=[str(i) for i in range(10)])
    back = load(tmp_path)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(back(x), m(x))
    assert back.vitkit_manifest.transforms[0].config == {"compression": 2, "channels": 24}


def test_stem_trains_on_digits(tmp_path, quick):
    from vitkit.api import train_model

    cfg = quick(model="vitkit_nano_p4_16", epochs=6, transforms=["stem:compression=2"])
    run = train_model(cfg, tmp_path / "stem", quiet=True)
    assert run.metrics["top1"] > 0.45  # chance is 0.1 with 4 tokens per image


def test_stem_bad_input():
    with pytest.raises(VitkitError, match="compression 3 does not divide the image"):
        apply_stem(create_model("vitkit_micro_p4_16", num_classes=10), {"compression": 3})
    with pytest.raises(VitkitError, match="cannot take a compressed stem"):
        apply_stem(create_model("vitkit_dhvt_nano_p4_16", num_classes=10))
    with pytest.raises(VitkitError, match="cannot take a compressed stem"):
        apply_stem(create_model("resnet18", num_classes=10))
    m = apply_stem(create_model("vitkit_micro_p4_16", num_classes=10))
    with pytest.raises(VitkitError, match="cannot take a compressed stem"):  # already compressed
        apply_stem(m)
    with pytest.raises(VitkitError, match="stem: option 'compression'"):
        apply_stem(create_model("vitkit_micro_p4_16", num_classes=10), {"compression": 1})


def test_cli_compression_that_does_not_divide_exits_2(tmp_path, capsys):
    from vitkit.cli import main

    code = main(["train", "--transform", "stem:compression=3", "-o", str(tmp_path / "r"), "--epochs", "1"])
    assert code == 2
    assert "compression 3 does not divide the image" in capsys.readouterr().err
