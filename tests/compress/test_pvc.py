"""PVC (LLaVA-UHD v3): window merging equals the official WTC on the same tokens, the content-aware
merger starts as the mean, RPE resizes the patch embedding and position embedding, the stage runs
and refuses bad options in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit.compress.tokens.pvc import WTCMerger, apply_pvc, pvc_tokens, window_merge
from vitkit.errors import VitkitError
from vitkit.models import create_model


def _official_wtc(x_i: torch.Tensor, h: int, w: int, mode: str, attn_layer=None, num_head: int = 16):
    """thunlp/LLaVA-UHD WTC.forward for one image (packed (h*w, C) tokens), einops written out."""
    c = x_i.shape[-1]
    x_i = x_i.view(h, w, c)
    if mode == "avg_pooling":
        y = F.avg_pool2d(x_i.permute(2, 0, 1), kernel_size=2, stride=2)  # 'h w c -> c h w'
        return y.permute(1, 2, 0).reshape(-1, c)  # 'c h w -> (h w) c'
    # '(h p1) (w p2) c -> (h w) (p1 p2) c'
    x_i = x_i.view(h // 2, 2, w // 2, 2, c).permute(0, 2, 1, 3, 4).reshape(-1, 4, c)
    pooled = x_i.mean(-2, keepdim=True).expand(-1, 4, -1)
    logits = attn_layer(torch.cat([x_i, pooled], dim=-1))
    n = logits.shape[0]
    logits = logits.view(n, 4, num_head, c // num_head).permute(0, 2, 1, 3)  # 'n s (m d) -> n m s d'
    weights = F.softmax(logits, dim=-2).permute(0, 2, 1, 3).reshape(n, 4, c)  # back to 'n s (m d)'
    return (x_i * weights).sum(-2)


def test_window_merge_equals_the_official_wtc():
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 36, 32)  # cls + a 6x6 grid
    out = window_merge(x, prefix=1)
    assert out.shape == (3, 1 + 9, 32) and torch.equal(out[:, 0], x[:, 0])
    for b in range(3):
        torch.testing.assert_close(
            out[b, 1:], _official_wtc(x[b, 1:], 6, 6, "avg_pooling"), rtol=0, atol=1e-6
        )
    merger = WTCMerger(32)
    torch.testing.assert_close(window_merge(x, 1, merger), out, rtol=0, atol=1e-6)  # zero init = the mean
    torch.nn.init.normal_(merger[2].weight)  # a trained merger: content-aware weights
    got = window_merge(x, 1, merger)
    for b in range(3):
        ref = _official_wtc(x[b, 1:], 6, 6, "m_pooling", attn_layer=merger)
        torch.testing.assert_close(got[b, 1:], ref, rtol=0, atol=1e-5)
    assert not torch.allclose(got, out, atol=1e-3)


def test_odd_grids_are_padded_and_non_square_refused():
    x = torch.randn(2, 25, 8)  # 5x5, no prefix
    out = window_merge(x, 0)
    assert out.shape == (2, 9, 8)
    g = x.view(2, 5, 5, 8)
    torch.testing.assert_close(out[:, 8], g[:, 4, 4])  # the corner window is the repeated last token
    with pytest.raises(VitkitError, match="not a square grid"):
        window_merge(torch.randn(1, 12, 8), 0)


def test_rpe_and_wtc_on_a_vit():
    model = create_model("vitkit_micro_p4_16", num_classes=10)
    pos0 = model.pos_embed.detach().clone()
    apply_pvc(model, {"patch": 2, "at": [0, 2], "mode": "avg"})
    assert model.patch_embed.proj.kernel_size == (2, 2) and tuple(model.patch_embed.grid_size) == (8, 8)
    assert model.pos_embed.shape == (1, 1 + 64, pos0.shape[-1])
    torch.testing.assert_close(model.pos_embed[:, :1], pos0[:, :1])  # the class token's is kept
    assert pvc_tokens(model) == 4  # 64 -> 16 -> 4 (4 ** merges fewer: the code's per-side ratio trap)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 16, 16))
    assert feats.shape == (2, 1 + 4, 64)


def test_reduce_tokens_pvc_stage(trained_run, tmp_path):
    import vitkit
    from vitkit.stages.compress import reduce_tokens_run

    res = reduce_tokens_run(trained_run, tmp_path / "pvc", method="pvc", at=[1], merge="avg")
    assert res.metrics["top1"] > 0.5  # one 2x2 merge after block 1 of the trained micro ViT, off the shelf
    assert vitkit.load(tmp_path / "pvc").blocks[1].__class__.__name__ == "WTCBlock"


def test_bad_options():
    m = create_model("vitkit_micro_p4_16", num_classes=10)
    with pytest.raises(VitkitError, match="give a patch size"):
        apply_pvc(m, {})
    with pytest.raises(VitkitError, match="block 9 does not exist"):
        apply_pvc(m, {"at": [9]})
    with pytest.raises(VitkitError, match="does not divide"):
        apply_pvc(create_model("vitkit_micro_p4_16", num_classes=10), {"patch": 3})
    with pytest.raises(VitkitError, match="merge a 1x1 grid"):
        apply_pvc(create_model("vitkit_micro_p4_16", num_classes=10), {"at": [0, 1, 2]})
