"""Gaussian mixture mask attention: parameter count, the documented limit behaviours, prefix tokens,
save/load, training on real data and bad input."""

from __future__ import annotations

import pytest
import torch

from vitkit.architecture.gmm import EPS, apply_gmm, gmm_masks, gmm_parameter_count
from vitkit.errors import VitkitError
from vitkit.models import attention_maps, count_parameters, create_model


def _peaky(name="vitkit_micro_p4_16", **kw):
    """A float64 model in eval mode whose attention is far from uniform (random init is nearly flat)."""
    torch.manual_seed(0)
    m = create_model(name, num_classes=10, **kw).double().eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(6)
    return m


def _x(n=2):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _set_masks(model, sigma, alpha):
    with torch.no_grad():
        for g in gmm_masks(model):
            g.sigma.fill_(sigma)
            g.alpha.zero_()
            for i, a in enumerate(alpha):
                g.alpha[i].fill_(a)


def _maps(model, x):
    with attention_maps(model) as maps:
        out = model(x)
    return out, [maps[i] for i in maps.layers]


@pytest.mark.parametrize("k", [1, 5])
def test_adds_exactly_2_k_heads_depth_parameters(k):
    m = create_model("vitkit_micro_p4_16", num_classes=10)  # depth 4, heads 4
    before = count_parameters(m)
    apply_gmm(m, {"k": k})
    assert count_parameters(m) - before == gmm_parameter_count(k, 4, 4) == 2 * k * 4 * 4
    assert all(g.sigma.requires_grad and g.alpha.requires_grad for g in gmm_masks(m))


def test_mask_matches_the_reference_formula():
    m = apply_gmm(create_model("vitkit_micro_p4_16", num_classes=10), {"k": 3})
    g = gmm_masks(m)[0]
    side = 4
    ref = torch.zeros(16, 16)
    for i in range(16):
        for j in range(16):
            ref[i, j] = -((i % side - j % side) ** 2 + (i // side - j // side) ** 2)
    ref = torch.exp(ref) ** 0.5  # the paper's code: On_attention_gaussian_mask
    want = torch.sum(g.alpha * ref ** (1 / (g.sigma**2 + EPS)), 0)
    torch.testing.assert_close(g.mask(), want, atol=1e-6, rtol=1e-5)
    assert torch.allclose(g.mask(), g.mask().transpose(-1, -2))


def test_flat_unit_mask_is_the_plain_model_and_flat_scaled_mask_keeps_rankings():
    plain = _peaky()
    x = _x()
    y0, maps0 = _maps(plain, x)
    m = apply_gmm(_peaky(), {"k": 3})
    _set_masks(m, sigma=1e6, alpha=[1.0, 0.0, 0.0])  # W == 1 everywhere
    y1, _ = _maps(m, x)
    torch.testing.assert_close(y1, y0, atol=1e-8, rtol=1e-8)
    _set_masks(m, sigma=1e6, alpha=[0.5, 0.9, 0.1])  # W == 1.5: a temperature
    y2, maps2 = _maps(m, x)
    assert (y2 - y0).abs().max() > 1e-4  # it does change the outputs...
    # ...but not which patch keys each query ranks first, second, ... (layer 0: the same input as the
    # plain model's; later layers see different inputs). Prefix logits keep scale 1, so only the
    # order among patch keys is kept.
    p = plain.num_prefix_tokens
    assert torch.equal(maps0[0][..., p:].argsort(-1), maps2[0][..., p:].argsort(-1))
    assert not torch.equal(maps0[0][..., p:], maps2[0][..., p:])


def test_zero_width_masks_documented_behaviour():
    plain = _peaky()
    x = _x()
    _, maps0 = _maps(plain, x)
    p = plain.num_prefix_tokens  # 1 (cls): never masked
    off = ~torch.eye(16, dtype=torch.bool)

    mult = apply_gmm(_peaky(), {"k": 2})
    _set_masks(mult, sigma=0.0, alpha=[0.7, 0.6])  # W = 1.3 * I on the patch grid
    _, maps_m = _maps(mult, x)
    for a in maps_m:
        patch_rows = a[:, :, p:, p:]  # patch queries over patch keys
        others = patch_rows[..., off]
        # every off-diagonal patch logit became 0: a query ranks all other patches equal
        ref = others.reshape(*others.shape[:2], 16, 15)
        assert torch.allclose(ref, ref[..., :1].expand_as(ref), atol=1e-12)
    # prefix queries are untouched (layer 0: the same input as the plain model's)
    torch.testing.assert_close(maps_m[0][:, :, :p], maps0[0][:, :, :p])

    add = apply_gmm(_peaky(), {"k": 2, "form": "additive"})
    _set_masks(add, sigma=0.0, alpha=[0.7, 0.6])  # bias = 1.3 * I: only the self logit moves
    _, maps_a = _maps(add, x)
    a0, a = maps0[0], maps_a[0]  # layer 0: the same input as the plain model's
    # per patch query, the ranking of the other keys is the plain one (self key parked at -1 in both)
    self_key = torch.zeros(16 + p, 16 + p, dtype=torch.bool)
    self_key[range(p, 16 + p), range(p, 16 + p)] = True
    ranks = [t.masked_fill(self_key, -1.0)[:, :, p:].argsort(-1) for t in (a, a0)]
    assert torch.equal(*ranks)
    assert (a - a0).abs().max() > 1e-3

    _set_masks(add, sigma=1e6, alpha=[0.0, 0.0])  # zero amplitude: the plain model
    torch.testing.assert_close(add(x), plain(x), atol=1e-8, rtol=1e-8)

    # the paper's prefix-free layout: a flat additive mask is a constant bias, which softmax ignores
    plain_np = _peaky(class_token=False, global_pool="avg")
    add_np = apply_gmm(_peaky(class_token=False, global_pool="avg"), {"k": 2, "form": "additive"})
    _set_masks(add_np, sigma=1e6, alpha=[0.7, 0.6])
    torch.testing.assert_close(add_np(x), plain_np(x), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize(
    ("name", "kwargs", "prefix"),
    [("vitkit_micro_distilled_p4_16", {}, 2), ("vitkit_micro_p4_16", {"reg_tokens": 2}, 3)],
)
def test_prefix_tokens_are_left_alone(name, kwargs, prefix):
    m = create_model(name, num_classes=10, **kwargs)
    assert m.num_prefix_tokens == prefix
    apply_gmm(m, {"k": 2})
    g = gmm_masks(m)[0]
    w = g.full(prefix + 16, torch.float32)
    assert torch.all(w[:, :prefix, :] == 1) and torch.all(w[:, :, :prefix] == 1)
    torch.testing.assert_close(w[:, prefix:, prefix:], g.mask())
    m.eval()
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("form", ["multiplicative", "additive"])
def test_save_load_rebuilds_masks(tmp_path, form):
    from vitkit.runs import load, save_model

    m = apply_gmm(create_model("vitkit_micro_p4_16", num_classes=10), {"k": 2, "form": form}).eval()
    with torch.no_grad():
        for g in gmm_masks(m):
            g.sigma.uniform_(0.5, 2.0)  # narrow masks: a visible effect
            g.alpha.uniform_(0.5, 3.0)
    save_model(tmp_path, m, classes=[str(i) for i in range(10)])
    back = load(tmp_path)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(back(x), m(x))
    assert [t.name for t in back.vitkit_manifest.transforms] == ["gmm"]


def test_gmm_trains_on_digits_through_train_transform(tmp_path, quick):
    from vitkit.api import train_model

    cfg = quick(model="vitkit_nano_p4_16", epochs=6, transforms=["gmm:k=3"])
    run = train_model(cfg, tmp_path / "gmm", quiet=True)
    assert run.metrics["top1"] > 0.6
    masks = gmm_masks(run.model)
    assert len(masks) == 2 and all(torch.isfinite(g.sigma).all() for g in masks)
    assert run.metrics["parameters"] == 19626 + gmm_parameter_count(3, 2, 2)


@pytest.mark.parametrize(
    ("name", "match"),
    [("vitkit_dhvt_nano_p4_16", "cannot take GMM"), ("resnet18", "no vitkit attention")],
)
def test_gmm_on_a_family_that_cannot_take_it(name, match):
    with pytest.raises(VitkitError, match=match):
        apply_gmm(create_model(name, num_classes=10), {"k": 2})


def test_gmm_bad_options_and_twice():
    m = create_model("vitkit_nano_p4_16", num_classes=10)
    with pytest.raises(VitkitError, match="gmm: option 'k'"):
        apply_gmm(m, {"k": 0})
    with pytest.raises(VitkitError, match="gmm: option 'form'"):
        apply_gmm(m, {"form": "sideways"})
    with pytest.raises(VitkitError, match="unknown option 'kernels'"):
        apply_gmm(m, {"kernels": 3})
    apply_gmm(m, {"k": 1})
    with pytest.raises(VitkitError, match="already has"):
        apply_gmm(m, {"k": 1})


def test_cli_bad_gmm_option_exits_2(tmp_path, capsys):
    from vitkit.cli import main

    code = main(["train", "--transform", "gmm:k=0", "-o", str(tmp_path / "r"), "--epochs", "1"])
    assert code == 2
    assert "gmm: option 'k'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
