"""The unfused attention module: identical to timm, hook points behave, hooks are removed."""

from __future__ import annotations

import pytest
import timm
import torch

from vitkit.errors import VitkitError
from vitkit.models import (
    MatMul,
    VitkitAttention,
    attention_maps,
    attention_modules,
    create_model,
    logit_hook,
)

# (name, kwargs): LayerScale, q/k-norm, register tokens, distillation token, plus a vitkit preset.
MODELS = [
    ("deit3_small_patch16_224", dict(img_size=32)),
    ("vit_tiny_patch16_224", dict(img_size=32, qk_norm=True)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32)),
    ("vitkit_micro_p4_16", {}),
]


def _pair(name, kw):
    torch.manual_seed(0)
    ours = create_model(name, **kw).eval()
    ref = timm.create_model(name, **kw).eval()
    ref.load_state_dict(ours.state_dict())  # same keys: the swap keeps timm's parameter names
    return ours, ref


@pytest.mark.parametrize("name,kw", MODELS, ids=[m[0] for m in MODELS])
def test_identical_to_timm_fused_and_unfused(name, kw):
    ours, ref = _pair(name, kw)
    assert all(type(m) is not timm.layers.Attention for m in ours.modules())
    n_attn = len(attention_modules(ours))
    assert n_attn == len(ref.blocks)
    size = ours.patch_embed.img_size
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        expect = ref(x)
        assert (ours(x) - expect).abs().max() <= 1e-5  # SDPA path
        for m in attention_modules(ours):
            m.force_unfused = True
        assert (ours(x) - expect).abs().max() <= 1e-5  # explicit qk_matmul/softmax/av_matmul path
        assert (ours.forward_features(x) - ref.forward_features(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name,kw", MODELS, ids=[m[0] for m in MODELS])
def test_attention_maps_any_layer(name, kw):
    ours, ref = _pair(name, kw)
    x = torch.randn(2, 3, *ours.patch_embed.img_size)
    tokens = ours.patch_embed.num_patches + ours.num_prefix_tokens
    heads = attention_modules(ours)[0].num_heads
    with torch.no_grad(), attention_maps(ours, layers=[0, -1]) as maps:
        out = ours(x)
        assert all(m._taps for m in (attention_modules(ours)[0], attention_modules(ours)[-1]))
    last = len(attention_modules(ours)) - 1
    assert maps.layers == [0, last]
    for _, a in maps.items():
        assert a.shape == (2, heads, tokens, tokens)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, heads, tokens))
    # Taps are removed on exit and did not change the output.
    assert not any(m._taps for m in attention_modules(ours))
    with torch.no_grad():
        assert (out - ref(x)).abs().max() <= 1e-5


def test_maps_equal_manual_softmax():
    ours, _ = _pair("vit_tiny_patch16_224", dict(img_size=32, qk_norm=True))
    attn = attention_modules(ours)[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = ours._pos_embed(ours.patch_embed(x))
        h = ours.blocks[0].norm1(tokens)
        B, N, _ = h.shape
        q, k, _ = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)  # q/k-norm must be applied before the scores
        expect = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        with attention_maps(ours, layers=0) as maps:
            ours(x)
    torch.testing.assert_close(maps[0], expect, atol=1e-6, rtol=1e-5)


def test_hooks_removed_when_block_raises():
    m = create_model("vitkit_nano_p4_16").eval()
    with pytest.raises(RuntimeError), attention_maps(m):
        raise RuntimeError("boom")
    assert all(not a._taps for a in attention_modules(m))
    with pytest.raises(RuntimeError), logit_hook(m, lambda mod, s: s):
        raise RuntimeError("boom")
    assert all(not a._logit_hooks and a.uses_sdpa for a in attention_modules(m))


def test_attn_bias_masks_a_key_on_both_paths():
    m = create_model("vitkit_nano_p4_16").eval()
    attn = attention_modules(m)[0]
    x = torch.randn(2, 3, 16, 16)
    n = m.patch_embed.num_patches + m.num_prefix_tokens

    def block_key_3(mod, q, k):
        bias = torch.zeros(n)
        bias[3] = float("-inf")
        return bias

    with torch.no_grad():
        base = m(x)
        handle = attn.register_attn_bias(block_key_3)
        assert attn.uses_sdpa  # an additive bias still runs the fused kernel
        fused = m(x)
        attn.force_unfused = True
        with attention_maps(m, layers=0) as maps:
            explicit = m(x)
        attn.force_unfused = False
        handle.remove()
        assert (m(x) - base).abs().max() == 0
    assert maps[0][..., 3].abs().max() == 0  # the masked key gets no attention
    assert (fused - explicit).abs().max() < 1e-5
    assert (fused - base).abs().max() > 1e-4  # the bias did act


def test_zero_bias_and_unit_temperature_are_exact():
    m = create_model("vitkit_nano_p4_16").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        base = m(x)
        handles = [a.register_attn_bias(lambda mod, q, k: torch.zeros(())) for a in attention_modules(m)]
        assert (m(x) - base).abs().max() <= 1e-6
        for h in handles:
            h.remove()
        with logit_hook(m, lambda mod, s: s / 1.0):
            assert (m(x) - base).abs().max() <= 1e-6
        with logit_hook(m, lambda mod, s: s / 4.0), attention_maps(m, layers=0) as hot:
            m(x)
        with attention_maps(m, layers=0) as cold:
            m(x)
    # Temperature > 1 flattens the attention distribution: higher entropy.
    ent = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1).mean()  # noqa: E731
    assert ent(hot[0]) > ent(cold[0])


def test_replacing_a_matmul_module_switches_to_explicit_path():
    m = create_model("vitkit_nano_p4_16").eval()
    calls = []

    class CountingMatMul(MatMul):
        def forward(self, a, b):
            calls.append(a.shape)
            return a @ b

    a0 = attention_modules(m)[0]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        base = m(x)
        a0.qk_matmul = CountingMatMul()
        assert not a0.uses_sdpa
        out = m(x)
    assert len(calls) == 1 and calls[0][-1] == a0.head_dim
    assert (out - base).abs().max() <= 1e-5


def test_key_tap_without_probs_keeps_fused_kernel():
    m = create_model("vitkit_nano_p4_16").eval()
    seen = {}
    a0 = attention_modules(m)[0]
    h = a0.register_tap(lambda s: seen.update(k=s.k.shape, probs=s.probs), needs_probs=False)
    assert a0.uses_sdpa
    with torch.no_grad():
        m(torch.randn(2, 3, 16, 16))
    h.remove()
    assert seen["probs"] is None and seen["k"] == (2, a0.num_heads, 17, a0.head_dim)


def test_attention_mask_matches_timm():
    ours, ref = _pair("vitkit_nano_p4_16", {})
    n = ours.patch_embed.num_patches + 1
    mask = torch.rand(n, n) > 0.3
    mask.fill_diagonal_(True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = ours.forward_features(x, attn_mask=mask)
        b = ref.forward_features(x, attn_mask=mask)
    assert (a - b).abs().max() <= 1e-5


def test_gradients_match_timm_in_training_mode():
    ours, ref = _pair("deit3_small_patch16_224", dict(img_size=32))
    ours.train()
    ref.train()
    x = torch.randn(2, 3, 32, 32)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    g1 = ours.blocks[0].attn.qkv.weight.grad
    g2 = ref.blocks[0].attn.qkv.weight.grad
    assert (g1 - g2).abs().max() <= 1e-5 * max(1.0, g2.abs().max().item())


def test_errors_for_models_without_vitkit_attention():
    cnn = create_model("test_resnet", num_classes=3)
    with pytest.raises(VitkitError, match="no token-to-token softmax attention"), attention_maps(cnn):
        pass
    timm_vit = create_model("vitkit_nano_p4_16", unfused_attention=False)  # timm's own Attention kept
    with pytest.raises(VitkitError, match="no vitkit attention modules"), attention_maps(timm_vit):
        pass
    vit = create_model("vitkit_nano_p4_16")
    with pytest.raises(VitkitError, match="layer 7 does not exist"), attention_maps(vit, layers=[7]):
        pass


def test_swap_is_by_exact_type():
    m = create_model("vitkit_nano_p4_16", unfused_attention=False)
    assert not attention_modules(m)
    m2 = create_model("vitkit_nano_p4_16")
    assert all(isinstance(a, VitkitAttention) for a in (b.attn for b in m2.blocks))
