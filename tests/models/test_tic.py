"""TiC (models/tic.py): the MSA-Conv operator and layer against a re-implementation of the official
code's logic on the same weights, the window's reach, the presets' sizes and forward contract, other
resolutions, no attention hooks, and a model that trains at 16 px, runs at 32 px, reloads, exports and
quantizes."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import (
    attention_maps,
    attention_modules,
    count_parameters,
    create_model,
    model_input_size,
    model_normalization,
    num_prefix_tokens,
)
from vitkit.models.tic import MSAConvMixer, msa_conv, set_grid_dilation


# -- the official logic (zs670980918/MSA-Conv @2d96f54), transcribed without einops ---------------
def official_qk(Q, K, window, dilation):
    """``MSA_Conv2d_v1(Q, K)`` as ``validation.py`` checks it: ``nn.Unfold`` of K with padding
    ``dilation (k - 1) // 2``, then the per-offset dot products: (B, K, H, W)."""
    B, C, H, W = K.shape
    kh, kw = window
    unfold = nn.Unfold(
        (kh, kw), dilation=dilation, padding=(dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    )
    k = unfold(K).reshape(B, C, kh * kw, H * W).permute(2, 1, 0, 3).reshape(kh * kw, C, B * H * W)
    q = Q.permute(1, 0, 2, 3).reshape(C, B * H * W).unsqueeze(0)  # 'b c h w -> c (b h w)'
    dot = torch.sum(torch.mul(q, k), dim=1)  # [K, BHW]
    return dot.reshape(kh * kw, B, H, W).permute(1, 0, 2, 3)  # 'k (b h w) -> b k h w'


def official_av(attn, V, window, dilation):
    """``MSA_Conv2d_1_v1(attn, V)`` as ``validation.py`` checks it: (B, C, H, W)."""
    B, C, H, W = V.shape
    kh, kw = window
    unfold = nn.Unfold(
        (kh, kw), dilation=dilation, padding=(dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    )
    v = unfold(V).reshape(B, C, kh * kw, H * W).permute(2, 1, 0, 3).reshape(kh * kw, C, B * H * W)
    dot1 = attn.permute(1, 0, 2, 3).reshape(kh * kw, B * H * W).unsqueeze(1)  # 'b k h w -> k (b h w)'
    out = torch.sum(torch.mul(dot1, v), dim=0)  # [C, BHW]
    return out.reshape(C, B, H, W).permute(1, 0, 2, 3)  # 'c (b h w) -> b c h w'


def official_layer(mixer: MSAConvMixer, x):
    """``MSA_Conv_2d.forward`` (``Transformer_in_Convolution.py``) on x (B, C, H, W) with the mixer's
    weights: the 1x1 qkv conv, one head over all C with scale C ** -0.5, softmax over the window,
    ``out += x``, the k x k "mlp" conv without bias (stride 1), ReLU. Eval: no dropout."""
    C = x.shape[1]
    qkv_conv = nn.Conv2d(C, 3 * C, 1)
    qkv_conv.weight.data = mixer.qkv.weight[:, :, None, None].clone()
    qkv_conv.bias.data = mixer.qkv.bias.clone()
    q, k, v = (t.float() for t in qkv_conv(x).chunk(3, dim=1))
    dots = official_qk(q, k, mixer.window, mixer.dilation) * C**-0.5
    attn = nn.Softmax(dim=1)(dots)
    out = official_av(attn, v, mixer.window, mixer.dilation)
    out += x
    out = mixer.conv(out)  # nn.Conv2d(C, C, k, stride=1, padding=k // 2, bias=False)
    nn.ReLU(inplace=True)(out)
    return out


# -- the operator and the layer ----------------------------------------------------------------
@pytest.mark.parametrize(
    "window,dilation,heads", [((3, 3), 1, 1), ((3, 3), 2, 4), ((5, 1), 2, 1), ((1, 5), 1, 2), ((5, 5), 1, 2)]
)
def test_operator_equals_the_official_unfold_reference(window, dilation, heads):
    """Per head (a channel group), the operator is the code's QK op, softmax over the window (dim 1),
    AV op; one head is the code's operator exactly."""
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 2, 16, 7, 6
    q, k, v = (torch.randn(B, heads, C // heads, H, W, generator=g) for _ in range(3))
    ours, probs = msa_conv(q, k, v, window, dilation, return_probs=True)
    for h in range(heads):
        dots = official_qk(q[:, h], k[:, h], window, dilation) * (C // heads) ** -0.5
        attn = nn.Softmax(dim=1)(dots)
        want = official_av(attn, v[:, h], window, dilation)
        assert (ours[:, h] - want).abs().max() < 1e-5
        assert (probs[:, h] - attn).abs().max() < 1e-6


@pytest.mark.parametrize("dilation", [1, 2])
def test_mixer_equals_the_official_layer_on_the_same_weights(dilation):
    torch.manual_seed(0)
    C, L = 16, 6
    mixer = MSAConvMixer(C, num_heads=1, dilation=dilation).eval()
    tokens = torch.randn(3, L * L, C)
    with torch.no_grad():
        ours = mixer(tokens)
        want = official_layer(mixer, tokens.transpose(1, 2).reshape(3, C, L, L))
    assert ours.shape == (3, L * L, C)
    assert (ours - want.flatten(2).transpose(1, 2)).abs().max() < 1e-5


def test_padding_keys_stay_in_the_softmax_as_zeros():
    """The code zero-pads k and v and does not mask: at a corner, 5 of the 9 window slots are keys of
    zeros (logit 0) that keep probability mass and add nothing."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 5, 5) for _ in range(3))
    _, probs = msa_conv(q, k, v, 3, 1, return_probs=True)
    torch.testing.assert_close(probs.sum(2), torch.ones(1, 1, 5, 5))
    corner = probs[0, 0, :, 0, 0]  # offsets (-1,-1) (-1,0) (-1,1) (0,-1) are outside, and (1,-1)
    outside = corner[[0, 1, 2, 3, 6]]
    assert torch.allclose(outside, outside[0].expand(5)) and outside.sum() > 0.05


def test_each_token_sees_only_its_dilated_window():
    """One mixer (``tail="linear"``: the attention alone): the gradient of token (3, 3) reaches exactly
    the 9 tokens of the 3x3 window of dilation 2 around it."""
    torch.manual_seed(0)
    L, C = 8, 8
    mixer = MSAConvMixer(C, num_heads=2, dilation=2, tail="linear")
    x = torch.randn(1, L * L, C, requires_grad=True)
    mixer(x)[0, 3 * L + 3].sum().backward()
    reach = (x.grad[0].abs().sum(-1) > 0).reshape(L, L)
    want = torch.zeros(L, L, dtype=torch.bool)
    want[1:6:2, 1:6:2] = True
    assert torch.equal(reach, want)


@pytest.mark.parametrize("tail", ["conv", "linear"])
def test_grid_dilation_is_the_dilated_layer_and_nothing_at_the_training_grid(tail):
    """On an 8x8 grid of a mixer trained on 4x4, grid_dilation is the same layer with the window and the
    conv tail dilated 2x (computed on the 2x2 interleaved subgrids); on 4x4 it changes nothing; on 6x6
    round(6 / 4) = 2 divides 6."""
    torch.manual_seed(0)
    C = 8
    mixer = MSAConvMixer(C, num_heads=2, dilation=1, tail=tail, grid_dilation=True, train_grid=4).eval()
    plain = MSAConvMixer(C, num_heads=2, dilation=1, tail=tail, train_grid=4).eval()
    plain.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 64, C)
    with torch.no_grad():
        q, k, v = mixer.qkv(x).transpose(1, 2).reshape(2, 3, 2, 4, 8, 8).unbind(1)
        o = msa_conv(q, k, v, 3, 2).reshape(2, C, 8, 8)
        if tail == "conv":
            grid = x.transpose(1, 2).reshape(2, C, 8, 8)
            want = (
                F.relu(F.conv2d(o + grid, mixer.conv.weight, padding=2, dilation=2))
                .flatten(2)
                .transpose(1, 2)
            )
        else:
            want = mixer.proj(o.flatten(2).transpose(1, 2))
        torch.testing.assert_close(mixer(x), want, rtol=1e-5, atol=1e-5)
        small = torch.randn(2, 16, C)
        torch.testing.assert_close(mixer(small), plain(small), rtol=0, atol=0)
    assert [mixer.grid_ratio(n) for n in (4, 6, 8, 12, 16, 7)] == [1, 2, 2, 3, 4, 1]


def test_under_bfloat16_autocast_the_operator_runs_in_float32():
    torch.manual_seed(0)
    m = create_model("vitkit_tic_nano_p4_16", num_classes=3).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    seen = []
    m.blocks[0].attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0].dtype))
    with torch.no_grad():
        want = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(x)
    assert seen == [torch.float32, torch.float32]  # the probabilities, in both runs
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_bad_options_and_layouts():
    with pytest.raises(VitkitError, match="window must be odd"):
        create_model("vitkit_tic_nano_p4_16", window=4)
    with pytest.raises(VitkitError, match="no class or register tokens"):
        create_model("vitkit_tic_nano_p4_16", class_token=True)
    with pytest.raises(VitkitError, match="tail must be"):
        MSAConvMixer(8, tail="mlp")
    with pytest.raises(VitkitError, match="dilation must be"):
        MSAConvMixer(8, dilation=0)
    with pytest.raises(VitkitError, match="square token grid"):
        MSAConvMixer(8)(torch.randn(1, 17, 8))
    m = create_model("vitkit_tic_nano_p4_16", num_classes=3).eval()
    with pytest.raises(VitkitError, match="square token grid"), torch.no_grad():
        m(torch.randn(1, 3, 16, 32))  # a 4x8 grid: the mixer sees N tokens, not the grid's shape
    assert create_model("vitkit_tic_nano_p4_16", window=[5, 3]).blocks[0].attn.window == (5, 3)
    with pytest.raises(VitkitError, match="no MSA-Conv mixers"):
        set_grid_dilation(create_model("vitkit_nano_p4_16"))


# -- the presets ----------------------------------------------------------------------------------
# name: img, grid side, width, depth, documented parameter range, plain-ViT match
PRESETS = {
    "vitkit_tic_nano_p4_16": (16, 4, 32, 2, (25_000, 50_000), None),
    "vitkit_tic_micro_p4_16": (16, 4, 64, 3, (180_000, 230_000), "vitkit_micro_p4_16"),
    "vitkit_tic_tiny_p4_32": (32, 8, 128, 7, (1_600_000, 2_000_000), "vitkit_tiny_p4_32"),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_sizes_and_forward_contract(name):
    img, side, dim, depth, (low, high), plain = PRESETS[name]
    assert timm.is_model(name)
    m = create_model(name, num_classes=10).eval()
    n = count_parameters(m)
    assert low <= n <= high, n
    if plain is not None:  # the docstring's match: within 5% of the plain preset's parameters
        assert abs(n / count_parameters(create_model(plain, num_classes=10)) - 1) < 0.05
    assert model_input_size(m) == (3, img, img)
    assert model_normalization(m) == ((0.5,) * 3, (0.5,) * 3)
    assert num_prefix_tokens(m) == 0 and m.pos_embed is None
    assert all(isinstance(b.attn, MSAConvMixer) for b in m.blocks)
    x = torch.rand(2, 3, img, img) * 2 - 1
    with torch.no_grad():
        feats = m.forward_features(x)
        logits = m.forward_head(feats)
        pooled = m.forward_head(feats, pre_logits=True)
        inter = m.forward_intermediates(x, intermediates_only=True)
        final, inter2 = m.forward_intermediates(x, indices=[0])
    assert feats.shape == (2, side * side, dim) and logits.shape == (2, 10) and pooled.shape == (2, dim)
    torch.testing.assert_close(m(x), logits)
    assert len(inter) == depth and inter[-1].shape == (2, dim, side, side)
    assert final.shape == feats.shape and len(inter2) == 1


def test_no_attention_hooks_attention_modules_is_empty_and_maps_refuse():
    m = create_model("vitkit_tic_nano_p4_16", num_classes=3)
    assert attention_modules(m) == []
    with pytest.raises(VitkitError, match="no token-to-token softmax attention"), attention_maps(m):
        pass


def test_runs_at_other_resolutions_with_the_same_weights():
    m = create_model("vitkit_tic_nano_p4_16", num_classes=3).eval()
    with torch.no_grad():
        for size, side in ((16, 4), (24, 6), (32, 8), (64, 16)):
            x = torch.rand(2, 3, size, size) * 2 - 1
            assert m(x).shape == (2, 3)
            assert m.forward_intermediates(x, intermediates_only=True)[-1].shape == (2, 32, side, side)
    # no position in the model: on a constant image, the tokens far enough from the zero-padded border
    # (a block reaches two 3x3 windows, the attention's then the conv's: 4 tokens for two blocks) are one
    # and the same vector at 64 and 96 px
    with torch.no_grad():
        f64 = m.forward_features(torch.full((1, 3, 64, 64), 0.3)).reshape(16, 16, -1)
        f96 = m.forward_features(torch.full((1, 3, 96, 96), 0.3)).reshape(24, 24, -1)
    inner = f96[12, 12]
    torch.testing.assert_close(f64[4:12, 4:12], inner.expand(8, 8, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f96[4:20, 4:20], inner.expand(16, 16, -1), rtol=1e-5, atol=1e-5)
    assert (f64[0, 0] - inner).abs().max() > 1e-3  # the border differs


def test_save_load_round_trip(tmp_path):
    import vitkit
    from vitkit.runs import save_model

    m = create_model("vitkit_tic_nano_p4_16", num_classes=3, in_chans=1).eval()
    save_model(tmp_path, m, classes=["a", "b", "c"], task="classification", data="digits")
    again = vitkit.load(tmp_path).eval()
    for size in (16, 32):
        x = torch.randn(2, 1, size, size)
        with torch.no_grad():
            torch.testing.assert_close(again(x), m(x), rtol=0, atol=0)


def _top1_at(model, dataset, size: int) -> float:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in model_normalization(model))
    x = dataset.images.float() / 255
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        pred = model.eval()((x - mean) / std).argmax(1)
    return float((pred == dataset.targets).float().mean())


@pytest.mark.slow
def test_tic_trains_at_16_runs_at_32_reloads_exports_and_quantizes(tmp_path):
    """The house contract on a new family: 3 epochs on digits at 16 px pass chance (0.1) by far, the
    model classifies the same images at 32 px (an 8x8 token grid), the run reloads to the same outputs,
    exports to ONNX with parity and takes W8A8."""
    import vitkit
    from vitkit.api import train_model
    from vitkit.runs import Run
    from vitkit.stages.export import export_run
    from vitkit.stages.quantize import quantize_run
    from vitkit.train import TrainConfig

    out = tmp_path / "tic"
    cfg = TrainConfig(model="vitkit_tic_nano_p4_16", data="digits", epochs=3, lr=3e-3, tensorboard=False)
    run = train_model(cfg, out, quiet=True)
    assert run.metrics["top1"] > 0.7, run.metrics["top1"]
    model = vitkit.load(out).eval()
    val = Run.open(out).eval_data()
    top1_16, top1_32 = _top1_at(model, val, 16), _top1_at(model, val, 32)
    with torch.no_grad():
        logits_32 = model(torch.rand(8, 3, 32, 32) * 2 - 1)
    assert top1_16 > 0.7 and torch.isfinite(logits_32).all() and logits_32.shape == (8, 10), top1_16
    # the same weights with the window dilated by the grid ratio: it covers the same part of the image
    set_grid_dilation(model)
    dilated_16, dilated_32 = _top1_at(model, val, 16), _top1_at(model, val, 32)
    assert dilated_16 == top1_16 and dilated_32 > 0.7 and dilated_32 > top1_32 + 0.3, (top1_32, dilated_32)
    set_grid_dilation(model, on=False)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), vitkit.load(out).eval()(x), rtol=0, atol=0)
    doc = export_run(out, images=32).doc
    assert doc["max_abs_logit_diff"] < 1e-4, doc
    summary, _ = quantize_run(out, tmp_path / "q", w_bits=8, a_bits=8, calib_size=64)
    assert abs(summary["drop_points"]) < 3.0, summary
