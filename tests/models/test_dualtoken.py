"""DualToken-ViT (models/dualtoken.py, a reading of the paper: no official code): the presets' sizes,
timm's feature contract, vitkit's attention maps over the global tokens, one block against a direct
transcription of the equations in the module docstring, the position-aware global tokens (aligned
with the image, carried through every block and stage), overrides and refusals, save/load, and a
model that trains on digits, reloads, exports and quantizes."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitkit.errors import VitkitError
from vitkit.models import (
    attention_maps,
    attention_modules,
    count_parameters,
    create_model,
    model_input_size,
    model_normalization,
    num_prefix_tokens,
    use_vitkit_attention,
)
from vitkit.models.attention import VitkitAttention
from vitkit.models.dualtoken import DualTokenBlock, DualTokenViT, downsample_steps

# name: img, stage widths, blocks per stage, heads per stage, stage map sides, documented parameter
# range, plain-ViT match
PRESETS = {
    "vitkit_dualtoken_nano_16": (16, (16, 32), (1, 1), (1, 2), (8, 4), (20_000, 60_000), None),
    "vitkit_dualtoken_micro_16": (
        16,
        (32, 64),
        (1, 2),
        (1, 2),
        (8, 4),
        (150_000, 250_000),
        "vitkit_micro_p4_16",
    ),
    "vitkit_dualtoken_tiny_32": (
        32,
        (96, 192),
        (1, 2),
        (3, 6),
        (16, 8),
        (1_500_000, 2_000_000),
        "vitkit_tiny_p4_32",
    ),
}
GRID = 4  # the presets' global grid: 16 position-aware global tokens


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_sizes_and_feature_contract(name):
    img, dims, depths, heads, sides, (low, high), plain = PRESETS[name]
    assert timm.is_model(name)
    m = create_model(name, num_classes=10).eval()
    assert isinstance(m, DualTokenViT)
    n = count_parameters(m)
    assert low <= n <= high, n
    if plain is not None:  # the docstring's match: within 10% of the plain preset's parameters
        assert abs(n / count_parameters(create_model(plain, num_classes=10)) - 1) < 0.1
    assert model_input_size(m) == (3, img, img)
    assert model_normalization(m) == ((0.5,) * 3, (0.5,) * 3)
    assert num_prefix_tokens(m) == 0 and m.no_weight_decay() == {"global_tokens"}
    total = sum(depths)
    # vitkit's attention replaced timm's in every block's global aggregation
    assert len(attention_modules(m)) == total
    assert all(type(b.aggregate.attn) is VitkitAttention for s in m.stages for b in s.blocks)

    x = torch.rand(2, 3, img, img) * 2 - 1
    with torch.no_grad():
        with attention_maps(m) as maps:
            feats = m.forward_features(x)
        logits = m.forward_head(feats)
        pooled = m.forward_head(feats, pre_logits=True)
        inter = m.forward_intermediates(x, intermediates_only=True)
        final, inter_nlc = m.forward_intermediates(x, indices=[0], output_fmt="NLC")
        last = m.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert feats.shape == (2, dims[-1], sides[-1], sides[-1])
    assert logits.shape == (2, 10) and pooled.shape == (2, dims[-1])
    torch.testing.assert_close(m(x), logits)
    torch.testing.assert_close(final, feats)
    torch.testing.assert_close(last[0], feats)  # norm=True: the final norm on the last block's map
    expected = [(2, d, s, s) for d, k, s in zip(dims, depths, sides) for _ in range(k)]
    assert [tuple(t.shape) for t in inter] == expected
    assert inter_nlc[0].shape == (2, sides[0] ** 2, dims[0])
    assert len(m.feature_info) == total and m.feature_info[-1]["num_chs"] == dims[-1]

    # attention maps: one per block, over the g*g global tokens, rows sum to one
    assert maps.layers == list(range(total))
    block_heads = [h for h, k in zip(heads, depths) for _ in range(k)]
    for layer, h in enumerate(block_heads):
        p = maps[layer]
        assert p.shape == (2, h, GRID**2, GRID**2)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, h, GRID**2))

    groups = m.group_matcher()
    assert set(groups) == {"stem", "blocks"}
    m.reset_classifier(3)
    assert m.get_classifier().out_features == 3 and m(x).shape == (2, 3)


def _transcription(
    blk: DualTokenBlock, x: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 1-6 of the module docstring written out with torch.nn.functional and explicit heads."""
    B, C, H, W = x.shape

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    def ln(t, m):
        return F.layer_norm(t, (C,), m.weight, m.bias, m.eps)

    def mha(q_in, kv_in, wq, bq, wk, bk, wv, bv, wo, bo, heads):
        d = C // heads
        out = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            q = q_in @ wq[sl].T + bq[sl]
            k = kv_in @ wk[sl].T + bk[sl]
            v = kv_in @ wv[sl].T + bv[sl]
            out.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v)
        return torch.cat(out, -1) @ wo.T + bo

    def mlp(t, m):
        return F.linear(F.gelu(F.linear(t, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)

    # 1. local branch: X_loc = X + PW2(GELU(PW1(BN(DW3x3(X)))))
    enc = blk.local
    h = F.conv2d(x, enc.dw.weight, enc.dw.bias, padding=1, groups=C)
    h = F.conv2d(bn(h, enc.norm), enc.mlp.fc1.weight, enc.mlp.fc1.bias)
    x_loc = x + F.conv2d(F.gelu(h), enc.mlp.fc2.weight, enc.mlp.fc2.bias)
    # 2. step-wise downsampling: (BN . DW3x3/2)^s
    d = x_loc
    for step in blk.downsample:
        d = bn(F.conv2d(d, step.conv.weight, step.conv.bias, stride=2, padding=1, groups=C), step.bn)
    x_ds = d.flatten(2).transpose(1, 2)
    # 3. position-aware fusion, cell by cell
    o = blk.fuse_logits
    w0 = torch.exp(o[0]) / (torch.exp(o[0]) + torch.exp(o[1]))
    z = w0 * x_ds + (1 - w0) * g
    # 4. global aggregation: G' = Z + MSA(LN(Z)); G' = G' + MLP(LN(G'))
    a = blk.aggregate
    wq, wk, wv = a.attn.qkv.weight.chunk(3)
    bq, bk, bv = a.attn.qkv.bias.chunk(3)
    zn = ln(z, a.norm1)
    g_new = z + mha(zn, zn, wq, bq, wk, bk, wv, bv, a.attn.proj.weight, a.attn.proj.bias, a.attn.num_heads)
    g_new = g_new + mlp(ln(g_new, a.norm2), a.mlp)
    # 5. broadcast: the H*W local tokens query the updated global tokens
    br = blk.broadcast
    wk2, wv2 = br.kv.weight.chunk(2)
    bk2, bv2 = br.kv.bias.chunk(2)
    t = x_loc.flatten(2).transpose(1, 2)
    x_glob = mha(
        ln(t, blk.norm_x), ln(g_new, blk.norm_g), br.q.weight, br.q.bias, wk2, bk2, wv2, bv2,
        br.proj.weight, br.proj.bias, br.num_heads,
    )  # fmt: skip
    # 6. fusion, then the token MLP
    y = t + x_glob
    y = y + mlp(ln(y, blk.norm_mlp), blk.mlp)
    return y.transpose(1, 2).reshape(B, C, H, W), g_new


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)


@pytest.mark.parametrize("steps,side", [(1, 8), (2, 16), (0, 4)])
def test_block_equals_a_transcription_of_the_paper_equations(steps, side):
    """Hand-made inputs (a ramp map, a grid of global tokens that differ by cell) through one block,
    timm's attention and vitkit's, against eqs. 1-6 written out; float64, < 1e-5."""
    torch.manual_seed(0)
    C = 8
    blk = DualTokenBlock(C, num_heads=2, steps=steps, mlp_ratio=2.0).double().eval()
    _randomize(blk)
    with torch.no_grad():
        blk.fuse_logits.copy_(torch.tensor([0.7, -0.4]))
    ramp = torch.linspace(-1, 1, side, dtype=torch.float64)
    x = (
        ramp[None, None, :, None] * ramp[None, None, None, :]
        + torch.arange(C, dtype=torch.float64)[None, :, None, None] / C
    )
    x = torch.cat([x, -x.flip(-1)])  # (2, C, side, side)
    cells = torch.arange(GRID**2, dtype=torch.float64)
    g = torch.stack(
        [cells[:, None] / 16 + torch.arange(C) / 8, (cells[:, None] % GRID) - torch.arange(C) / 4]
    )
    with torch.no_grad():
        want_x, want_g = _transcription(blk, x, g)
        got_x, got_g = blk(x, g)
        assert (got_x - want_x).abs().max() < 1e-5 and (got_g - want_g).abs().max() < 1e-5
        assert got_g.shape == (2, GRID**2, C) and got_x.shape == x.shape
        use_vitkit_attention(blk)  # the hookable module computes the same block
        assert type(blk.aggregate.attn) is VitkitAttention
        hooked_x, hooked_g = blk(x, g)
    assert (hooked_x - want_x).abs().max() < 1e-5 and (hooked_g - want_g).abs().max() < 1e-5


def test_fusion_rule_on_hand_made_tokens():
    """Eq. 3: softmax-normalised weights, cell by cell; equal weights at initialisation."""
    blk = DualTokenBlock(4, num_heads=1, steps=0)
    x_ds = torch.ones(1, GRID**2, 4)
    g = torch.arange(GRID**2, dtype=torch.float32)[None, :, None].expand(1, -1, 4)
    torch.testing.assert_close(blk.fuse(x_ds, g), 0.5 * x_ds + 0.5 * g)
    with torch.no_grad():
        blk.fuse_logits.copy_(torch.tensor([math.log(3.0), 0.0]))  # weights 3/4, 1/4
    torch.testing.assert_close(blk.fuse(x_ds, g), 0.75 * x_ds + 0.25 * g)


def test_global_tokens_are_position_aware():
    """Each global token is tied to its image cell: a change at a pixel of the map reaches, through
    the step-wise downsampling, only the fused token of that pixel's cell (before the aggregation
    mixes them); and the grid is carried through every block and across stages."""
    torch.manual_seed(0)
    blk = DualTokenBlock(8, num_heads=2, steps=2).eval()
    _randomize(blk, seed=1)
    x = torch.randn(1, 8, 16, 16)
    g = torch.randn(1, GRID**2, 8)
    with torch.no_grad():
        base = blk.fuse(blk.downsample(x).flatten(2).transpose(1, 2), g)
        for (r, c), cell in [((0, 0), 0), ((15, 15), 15), ((0, 15), 3), ((8, 4), 9)]:
            moved = x.clone()
            moved[..., r, c] += 5.0
            z = blk.fuse(blk.downsample(moved).flatten(2).transpose(1, 2), g)
            changed = (z - base).abs().amax(-1)[0] > 1e-6
            assert changed.nonzero().flatten().tolist() == [cell], (r, c, changed)

    m = create_model("vitkit_dualtoken_micro_16", num_classes=10).eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (g in, g out) of every block, in order
    hooks = [
        b.register_forward_hook(lambda mod, args, out: seen.append((args[1], out[1])))
        for s in m.stages
        for b in s.blocks
    ]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        logits = m(x)
        torch.testing.assert_close(seen[0][0], m.global_tokens.expand(2, -1, -1))  # G_0: the learned grid
        torch.testing.assert_close(seen[1][0], m.stages[1].global_proj(seen[0][1]))  # into stage 2
        torch.testing.assert_close(seen[2][0], seen[1][1])  # block to block
        assert all(g_out.shape[1] == GRID**2 for _, g_out in seen)
        # the initial grid reaches the logits (a shift by one constant would not: every path from G
        # starts with a LayerNorm)
        m.global_tokens.add_(torch.randn_like(m.global_tokens))
        assert (m(x) - logits).abs().max() > 1e-4
    for h in hooks:
        h.remove()


def test_img_size_in_chans_and_refusals():
    assert downsample_steps(16, 4) == 2 and downsample_steps(7, 4) == 1 and downsample_steps(4, 4) == 0
    m = create_model("vitkit_dualtoken_nano_16", num_classes=3, img_size=32, in_chans=1).eval()
    assert model_input_size(m) == (1, 32, 32) and m.map_sides == [16, 8]
    assert [s.blocks[0].downsample.steps for s in m.stages] == [2, 1]
    with torch.no_grad(), attention_maps(m, layers=[-1]) as maps:
        assert m(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert maps[1].shape == (2, 2, GRID**2, GRID**2)
    odd = create_model("vitkit_dualtoken_nano_16", img_size=28).eval()  # 14x14 then 7x7: ceil halving
    assert odd.map_sides == [14, 7] and odd(torch.randn(1, 3, 28, 28)).shape == (1, 10)
    with pytest.raises(VitkitError, match="cannot be halved step by step"):
        create_model("vitkit_dualtoken_nano_16", img_size=12)  # 6x6 then 3x3: below the 4x4 grid
    with pytest.raises(VitkitError, match="built for 16x16 inputs"):
        m16 = create_model("vitkit_dualtoken_nano_16")
        m16(torch.randn(1, 3, 32, 32))
    with pytest.raises(VitkitError, match="not class or register tokens"):
        create_model("vitkit_dualtoken_nano_16", class_token=True)

    pruned = create_model("vitkit_dualtoken_micro_16").eval()
    assert pruned.prune_intermediate_layers(indices=[1]) == [1]
    assert len(pruned.stages) == 2 and len(pruned.stages[1].blocks) == 1
    with torch.no_grad():
        assert pruned.forward_features(torch.randn(1, 3, 16, 16)).shape == (1, 64, 4, 4)
    feats = timm.create_model("vitkit_dualtoken_micro_16", features_only=True, out_indices=(0, 2))
    assert [tuple(f.shape) for f in feats(torch.randn(1, 3, 16, 16))] == [(1, 32, 8, 8), (1, 64, 4, 4)]


def test_pretrained_file_keeps_the_body_and_drops_another_head(tmp_path):
    src = create_model("vitkit_dualtoken_nano_16", num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    m = create_model("vitkit_dualtoken_nano_16", num_classes=3, pretrained_file=path)
    assert m.get_classifier().out_features == 3
    torch.testing.assert_close(m.global_tokens, src.global_tokens)
    torch.testing.assert_close(m.stem[0].conv.weight, src.stem[0].conv.weight)


def test_save_load_round_trip_with_overrides(tmp_path):
    import vitkit
    from vitkit.runs import save_model

    m = create_model("vitkit_dualtoken_nano_16", num_classes=3, img_size=32, in_chans=1, drop_path_rate=0.1)
    m.train()
    m(torch.randn(4, 1, 32, 32))  # moves the BatchNorm statistics off their initial values
    m.eval()
    save_model(tmp_path, m, classes=["a", "b", "c"], task="classification")
    again = vitkit.load(tmp_path).eval()
    assert isinstance(again, DualTokenViT) and model_input_size(again) == (1, 32, 32)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), m(x), rtol=0, atol=0)


@pytest.mark.slow
def test_dualtoken_trains_reloads_exports_and_quantizes(tmp_path):
    """The house contract on a new family: 5 epochs on digits pass chance (0.1) by far, the run reloads
    to the same outputs, exports to ONNX with parity and takes W8A8."""
    import vitkit
    from vitkit.api import train_model
    from vitkit.stages.export import export_run
    from vitkit.stages.quantize import quantize_run
    from vitkit.train import TrainConfig

    out = tmp_path / "dualtoken"
    cfg = TrainConfig(model="vitkit_dualtoken_nano_16", data="digits", epochs=5, lr=3e-3, tensorboard=False)
    run = train_model(cfg, out, quiet=True)
    assert run.metrics["top1"] > 0.8, run.metrics["top1"]  # measured 0.969 / 0.975 / 0.969 (seeds 0, 1, 2)
    model = vitkit.load(out).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), vitkit.load(out).eval()(x), rtol=0, atol=0)
    assert len(attention_modules(model)) == 2
    doc = export_run(out, images=32).doc
    assert doc["max_abs_logit_diff"] < 1e-4, doc
    summary, _ = quantize_run(out, tmp_path / "q", w_bits=8, a_bits=8, calib_size=64)
    assert abs(summary["drop_points"]) < 3.0, summary
