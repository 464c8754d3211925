"""DHVT: parameter counts against the formulas (and the paper), the three parts' shapes and
invariants, vitkit hooks inside, training on real data, save/load and bad input."""

from __future__ import annotations

import pytest
import torch

from vitkit.errors import VitkitError
from vitkit.models import attention_maps, count_parameters, create_model
from vitkit.models.dhvt import DAFF, SOPE, HeadInteractionAttention, dhvt_parameter_count

PRESETS = {
    "vitkit_dhvt_nano_p4_16": dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, img_size=16),
    "vitkit_dhvt_micro_p4_16": dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=3.0, img_size=16),
    "vitkit_dhvt_tiny_p4_32": dict(embed_dim=192, depth=12, num_heads=4, mlp_ratio=4.0, img_size=32),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_match_the_formula(name):
    a = PRESETS[name]
    m = create_model(name, num_classes=10)
    assert count_parameters(m) == dhvt_parameter_count(
        a["embed_dim"], a["depth"], a["num_heads"], a["mlp_ratio"], 4, 10, img_size=a["img_size"]
    )


@pytest.mark.parametrize(
    "parts",
    [
        dict(sope=False),
        dict(daff=False),
        dict(head_tokens=False),
        dict(sope=False, daff=False, head_tokens=False),
    ],
)
def test_ablation_parameter_counts_match_the_formula(parts):
    m = create_model("vitkit_dhvt_micro_p4_16", num_classes=7, **parts)
    assert count_parameters(m) == dhvt_parameter_count(64, 4, 4, 3.0, 4, 7, img_size=16, **parts)


def test_patch16_sope_chain_and_the_papers_imagenet_counts():
    # the 4-conv SOPE chain (patch 16) counted by the formula...
    m = create_model("vitkit_dhvt_nano_p4_16", num_classes=5, img_size=64, patch_size=16)
    assert count_parameters(m) == dhvt_parameter_count(32, 2, 2, 2.0, 16, 5, img_size=64)
    assert [c.conv.out_channels for c in m.patch_embed.proj] == [4, 8, 16, 32]
    # ...and the paper's ImageNet models (6.2M, 23.8M parameters, rounded) within 1%
    tiny = dhvt_parameter_count(192, 12, 4, 4.0, 16, 1000, img_size=224)
    small = dhvt_parameter_count(384, 12, 8, 4.0, 16, 1000, img_size=224)
    assert abs(tiny / 6.2e6 - 1) < 0.01 and abs(small / 23.8e6 - 1) < 0.01


def test_sope_hi_mhsa_daff_shapes_and_invariants():
    x = torch.randn(2, 3, 32, 32)
    sope = SOPE(img_size=32, patch_size=4, in_chans=3, embed_dim=48)
    assert sope(x).shape == (2, 64, 48)  # patch 4 on 32x32: an 8x8 grid
    tokens = torch.randn(2, 65, 48)
    hi = HeadInteractionAttention(48, num_heads=4, qkv_bias=True)
    assert hi(tokens).shape == (2, 65, 48)  # head tokens never leave the layer
    daff = DAFF(48, 96).eval()
    out = daff(tokens)
    assert out.shape == (2, 65, 48)
    # the CLS token (position 0) is only rescaled: patch outputs do not depend on it
    moved = tokens.clone()
    moved[:, 0] += 5
    out2 = daff(moved)
    torch.testing.assert_close(out2[:, 1:], out[:, 1:])
    assert not torch.allclose(out2[:, 0], out[:, 0])


def test_vitkit_hooks_work_inside_hi_mhsa():
    m = create_model("vitkit_dhvt_nano_p4_16", num_classes=10).eval()
    with attention_maps(m, layers=[0]) as maps:
        m(torch.randn(2, 3, 16, 16))
    # 1 CLS + 16 patches + 2 head tokens, rows sum to one
    assert maps[0].shape == (2, 2, 19, 19)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 19))


def test_dhvt_trains_on_digits_and_reloads(tmp_path, quick):
    from vitkit.api import train_model
    from vitkit.runs import load

    cfg = quick(model="vitkit_dhvt_nano_p4_16", epochs=4, lr=3e-3)
    run = train_model(cfg, tmp_path / "dhvt", quiet=True)
    assert run.metrics["top1"] > 0.7  # a plain nano ViT is near 0.5 after the same 4 epochs
    back = load(run.path)
    x = torch.randn(4, 3, 16, 16)
    run.model.eval()
    torch.testing.assert_close(back(x), run.model(x))  # BatchNorm statistics come back too


def test_dhvt_options_on_a_family_that_cannot_take_them():
    with pytest.raises(VitkitError, match="rejected its arguments"):
        create_model("vitkit_micro_p4_16", num_classes=10, head_tokens=False)
    with pytest.raises(VitkitError, match="class_token=True"):
        create_model("vitkit_dhvt_nano_p4_16", num_classes=10, class_token=False)
    with pytest.raises(VitkitError, match="patch of 2, 4, 8 or 16"):
        create_model("vitkit_dhvt_nano_p4_16", num_classes=10, patch_size=3, img_size=15)
    with pytest.raises(VitkitError, match="not divisible"):
        create_model("vitkit_dhvt_nano_p4_16", num_classes=10, img_size=18)


def test_cli_dhvt_option_on_plain_vit_exits_2(tmp_path, capsys):
    from vitkit.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: vitkit_micro_p4_16\nmodel_kwargs: {daff: false}\nepochs: 1\n")
    code = main(["train", "-c", str(cfg), "-o", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "vitkit_micro_p4_16" in err and "daff" in err
