"""Pruning: structured (smaller dense model, reload), LPViT (tiles, FLOPs budget), DIMAP (scores)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vitkit.compress.prune import (
    DIMAPConfig,
    MaskedLinear,
    apply_dimap,
    apply_lpvit,
    apply_structured_prune,
    is_tile_constant,
    module_scores,
    prunable_linears,
    sparsity_report,
)
from vitkit.compress.prune.lpvit import derivative
from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.runs import load, save_model

CLASSES = [str(i) for i in range(10)]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("vitkit_micro_p4_16", **kw).eval()


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "init_values": 0.1, "reg_tokens": 1}])
def test_structured_prune_makes_a_smaller_model_that_reloads(tmp_path, kw):
    m = _model(**kw)
    before = sum(p.numel() for p in m.parameters())
    apply_structured_prune(m, {"heads": 0.25, "mlp": 0.5})
    assert all(b.attn.num_heads == 3 and b.attn.qkv.out_features == 3 * 48 for b in m.blocks)
    assert all(b.mlp.fc1.out_features == 128 and b.mlp.fc2.in_features == 128 for b in m.blocks)
    assert sum(p.numel() for p in m.parameters()) < 0.7 * before
    save_model(tmp_path / "p", m, classes=CLASSES)
    back = load(tmp_path / "p")
    assert back.vitkit_manifest.transforms[-1].config["blocks"][0] == {"num_heads": 3, "mlp_hidden": 128}
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_structured_prune_removes_the_unimportant_head():
    m = _model(depth=1)  # one block: the ratio removes one head there, the dead one
    attn = m.blocks[0].attn
    D, H = attn.head_dim, attn.num_heads
    with torch.no_grad():  # head 2 of block 0 contributes nothing
        for i in range(3):
            attn.qkv.weight[i * H * D + 2 * D : i * H * D + 3 * D] *= 1e-3
        attn.proj.weight[:, 2 * D : 3 * D] = 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
    apply_structured_prune(m, {"heads": 0.25})
    with torch.no_grad():  # removing a head that contributed nothing changes nothing
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_taylor_importance_needs_data_and_uses_gradients(digits):
    m = _model()
    with pytest.raises(VitkitError, match="needs labelled calibration data"):
        apply_structured_prune(copy.deepcopy(m), {"heads": 0.25, "importance": "taylor"})
    apply_structured_prune(
        m, {"heads": 0.25, "mlp": 0.25, "importance": "taylor"}, digits.train, calib_batches=1
    )
    assert m.blocks[0].attn.num_heads == 3
    assert all(p.grad is None for p in m.parameters())


def test_structured_prune_bad_ratios():
    m = _model()
    for heads in (1.0, -0.1):
        with pytest.raises(VitkitError, match=r"prune heads: the fraction removed must be in \[0, 1\)"):
            apply_structured_prune(copy.deepcopy(m), {"heads": heads})
    with pytest.raises(VitkitError, match="has 4 heads and would keep none"):
        apply_structured_prune(copy.deepcopy(m), {"heads": 0.9})
    with pytest.raises(VitkitError, match="expected one of magnitude, taylor"):
        apply_structured_prune(copy.deepcopy(m), {"heads": 0.25, "importance": "random"})


def test_lpvit_meets_the_flops_budget_with_tile_masks(tmp_path, digits):
    m = _model()
    apply_lpvit(m, {"flops": 0.6, "block": 16, "max_rate": 0.9}, digits.train, calib_batches=1, batch_size=32)
    rep = sparsity_report(m, (3, 16, 16))
    assert rep["flops_fraction"] == pytest.approx(0.6, abs=0.01)
    rates = m.vitkit_manifest.transforms[-1].config["rates"]
    assert max(rates.values()) <= 0.9
    for name, lin in prunable_linears(m):
        assert isinstance(lin, MaskedLinear) and is_tile_constant(lin.weight_mask, 16)
        kept = lin.weight_mask.mean().item()
        assert kept == pytest.approx(1 - rates[name], abs=1.0 / (lin.weight.numel() / 256))
    save_model(tmp_path / "l", m, classes=CLASSES)
    back = load(tmp_path / "l")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_lpvit_bad_inputs(digits):
    m = _model()
    with pytest.raises(VitkitError, match="not a multiple of the tile size"):
        apply_lpvit(copy.deepcopy(m), {"block": 24}, digits.train)
    with pytest.raises(VitkitError, match="cannot go below"):
        apply_lpvit(copy.deepcopy(m), {"flops": 0.02}, digits.train, calib_batches=1, batch_size=32)
    with pytest.raises(VitkitError, match=r"must be in \(0, 1\)"):
        apply_lpvit(copy.deepcopy(m), {"flops": 1.2}, digits.train)


def test_five_point_derivative_is_exact_on_a_cubic():
    xs = np.linspace(0, 1, 101)
    d = derivative(xs, xs**3, 4)
    assert np.allclose(d[4:-4], 3 * xs[4:-5] ** 2, atol=1e-9)


def test_dimap_scores():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 6, generator=g), 10 * torch.randn(5, 4, generator=g)
    sa, sb = module_scores([a, b])
    s = torch.cat([sa.flatten(), sb.flatten()])
    w = torch.cat([a.flatten(), b.flatten()]).abs()
    assert (s > 0).all() and (s <= 1).all()
    assert s[w.argmax()] == 1
    order = w.argsort()
    assert (s[order].diff() >= -1e-7).all()  # monotone in |w| within a module


def test_dimap_hits_the_sparsity_without_data(tmp_path):
    m = _model()
    apply_dimap(m, DIMAPConfig(sparsity=0.6))
    rep = sparsity_report(m, (3, 16, 16))
    assert rep["sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert rep["flops_fraction"] < 0.5
    # module-aware: every module keeps its largest weights (score 1), so no module is emptied
    for _, lin in prunable_linears(m):
        assert lin.weight_mask.sum() > 0
        assert lin.weight_mask.flatten()[lin.weight.abs().argmax()] == 1
    save_model(tmp_path / "d", m, classes=CLASSES)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "d")(x), m(x))
    for bad in (0.0, 1.0):
        with pytest.raises(VitkitError, match=r"DIMAP sparsity"):
            apply_dimap(_model(), {"sparsity": bad})


def test_pruning_a_trained_model_then_finetuning(trained_run, tmp_path):
    from vitkit.stages.compress import prune_run

    res = prune_run(trained_run, tmp_path / "p", heads=0.25, mlp=0.25, finetune=2)
    m = res.metrics
    assert m["parameters"] < 0.8 * m["parameters_before"]
    assert m["top1"] >= m["source_top1"] - 0.05, m
    assert m["top1"] >= m["off_the_shelf_top1"] - 0.01, m
