"""EViT / ToMe token visualization: kept, fused and merged patches traced from the transforms."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from vitkit.analyze.attention import AttentionConfig, measure_attention, rollout
from vitkit.analyze.common import PixelModel
from vitkit.analyze.tokens import (
    DROPPED,
    FUSED,
    KEPT,
    TokenReductionConfig,
    follow_steps,
    measure_token_reduction,
    plot_token_reduction,
    token_rollout_matrix,
)
from vitkit.compress.tokens import apply_evit, apply_tome
from vitkit.compress.tokens.evit import kept_tokens
from vitkit.errors import VitkitError
from vitkit.models import attention_maps, create_model, num_prefix_tokens, token_reduction_trace


def _trace(model, x, layers):
    """One forward: the attention probabilities of ``layers`` and the token-reduction steps."""
    with attention_maps(model, layers) as rec, token_reduction_trace(model) as steps:
        PixelModel(model)(x)
    return rec, steps


def _models_with_prefix_tokens(micro):
    torch.manual_seed(0)
    return {
        "trained": micro,
        "registers": create_model("vitkit_micro_p4_16", reg_tokens=2, global_pool="avg").eval(),
        "distilled": create_model("vitkit_micro_distilled_p4_16").eval(),
    }


def test_evit_keep_one_marks_every_patch_kept(micro, digits):
    m = apply_evit(copy.deepcopy(micro), {"keep": 1.0, "at": [1, 2]})
    res = measure_token_reduction(m, digits.val)
    assert [b.block for b in res.blocks] == [1, 2]
    for b in res.blocks:
        assert (b.status == KEPT).all() and (b.size == 1).all() and b.n_kept_tokens == 16
    # and the attention analysis of the (unchanged) model is exactly the plain model's
    ref = measure_attention(micro, digits.val, AttentionConfig(layers=(0, 3)))
    got = measure_attention(m, digits.val, AttentionConfig(layers=(0, 3)))
    assert torch.equal(ref.rollout, got.rollout) and torch.equal(ref.maps[3], got.maps[3])


@pytest.mark.parametrize("which", ["trained", "registers", "distilled"])
def test_evit_kept_patches_are_the_top_k_by_class_attention(micro, digits, val_pixels, which):
    base = _models_with_prefix_tokens(micro)[which]
    P = num_prefix_tokens(base)
    m = apply_evit(copy.deepcopy(base), {"keep": 0.5, "at": [1, 2]})
    x = val_pixels[0][:16]
    rec, steps = _trace(m, x, [1, 2])
    b1, b2 = follow_steps(steps, 16)
    # block 1: ceil(0.5 * 16) = 8 patches kept, exactly the 8 the class token attends to most
    # (patch columns only: prefix tokens are never candidates), the other 8 fused
    k1 = kept_tokens(0.5, 16)
    assert (b1.status == KEPT).sum(1).eq(k1).all() and (b1.status == FUSED).sum(1).eq(16 - k1).all()
    cls_attn = rec[1][:, :, 0, P:].mean(1)  # (B, 16)
    top = cls_attn.topk(k1, dim=1).indices
    kept = torch.zeros_like(b1.status, dtype=torch.bool).scatter(1, top, True)
    assert torch.equal(kept, b1.status == KEPT)
    # block 2 sees 8 kept tokens + the fused one: keeps ceil(0.5 * 9) = 5 of them by its own attention
    k2 = kept_tokens(0.5, 9)
    assert b2.n_in == 9 and b2.n_kept_tokens == k2
    top2 = rec[2][:, :, 0, P:].mean(1).topk(k2, dim=1).indices  # token indices at block 2's input
    for i in range(len(x)):
        kept_patches = (b2.status[i] == KEPT).nonzero().flatten()
        want = set(top2[i].tolist()) - {k1}  # token k1 is the fused token: its patches stay "fused"
        assert set(b1.token[i, kept_patches].tolist()) == want
        assert (b1.status[i, kept_patches] == KEPT).all()  # kept now => kept before
    assert (b2.size.sum(1) == 16).all()  # every patch accounted for, prefix tokens never counted


@pytest.mark.parametrize("which", ["trained", "registers", "distilled"])
def test_tome_merged_groups_partition_the_patches_with_tome_sizes(micro, val_pixels, which):
    base = _models_with_prefix_tokens(micro)[which]
    m = apply_tome(copy.deepcopy(base), {"r": 2})
    x = val_pixels[0][:16]
    _, steps = _trace(m, x, [0])
    blocks = follow_steps(steps, 16)
    assert [b.n_out for b in blocks] == [14, 12, 10, 8]
    for (_, step), b in zip(steps, blocks):
        # a partition: every patch in exactly one of n_out non-empty groups
        assert ((b.token >= 0) & (b.token < b.n_out)).all()
        counts = torch.stack([torch.bincount(t, minlength=b.n_out) for t in b.token])
        assert (counts > 0).all() and (counts.sum(1) == 16).all()
        # the group sizes are ToMe's own size tensor, and the groups its own source map
        assert torch.equal(counts, b.size) and torch.equal(b.size.float(), step.size)
        assert torch.equal(b.token, step.source)
    assert (blocks[-1].size > 1).any()  # something was actually merged


def test_trace_leaves_no_taps_behind_also_on_error(micro, val_pixels):
    m = apply_tome(copy.deepcopy(micro), {"r": 2})
    blocks = list(m.blocks)
    with pytest.raises(RuntimeError), token_reduction_trace(m):
        assert all(b.has_token_taps for b in blocks)
        raise RuntimeError("boom")
    assert not any(b.has_token_taps for b in blocks)
    with torch.no_grad():  # and a plain forward still runs (the blocks emit nothing)
        m(val_pixels[0][:2])


def test_rollout_through_reductions_stays_row_stochastic(micro, val_pixels):
    for m in (
        apply_tome(copy.deepcopy(micro), {"r": 3}),
        apply_evit(copy.deepcopy(micro), {"keep": 0.5, "at": [1, 2]}),
    ):
        rec, steps = _trace(m, val_pixels[0][:4], [0, 1, 2, 3])
        states = follow_steps(steps, 16)
        reductions, size = {}, None
        for (li, step), st in zip(steps, states):
            M = token_rollout_matrix(step, 1, size_in=size)
            assert torch.allclose(M.sum(-1), torch.ones_like(M.sum(-1)))
            reductions[li], size = M, st.size
        r = rollout([rec[i] for i in range(4)], reductions=reductions)
        assert r.shape[-1] == 17 and r.shape[-2] == 1 + states[-1].n_out  # cls + final tokens
        assert torch.allclose(r.sum(-1), torch.ones_like(r.sum(-1)))


def test_token_view_of_a_plain_model_is_refused(micro, digits):
    with pytest.raises(VitkitError, match="no token-reduction blocks"):
        measure_token_reduction(micro, digits.val)


def test_attention_cli_on_an_evit_run_writes_the_token_view(trained_run, digits, tmp_path):
    import vitkit
    from vitkit.cli import main
    from vitkit.runs import save_model

    m = apply_evit(vitkit.load(trained_run), {"keep": 0.5, "at": [1, 2]})
    run = tmp_path / "evit"
    save_model(run, m, classes=list(digits.val.classes), data={"uri": "digits"})
    assert main(["attention", str(run), "--images", "4", "--layers", "1,3", "--data", "digits"]) == 0
    doc = json.loads((run / "attention" / "tokens.json").read_text())
    assert [b["block"] for b in doc["blocks"]] == [1, 2]
    assert [b["kept_tokens"] for b in doc["blocks"]] == [8, 5]
    status = torch.tensor(doc["blocks"][0]["status"])  # (images, 4, 4) on the patch grid
    assert status.shape == (4, 4, 4) and (status == KEPT).sum((1, 2)).eq(8).all()
    assert (run / "attention" / "tokens.png").stat().st_size > 1000
    att = json.loads((run / "attention" / "attention.json").read_text())
    assert att["stats"]["token_reduction_blocks"] == [1, 2] and len(att["rollout"]) == 4


def test_plot_has_one_panel_per_reduction_block(micro, digits, tmp_path):
    m = apply_tome(copy.deepcopy(micro), {"r": [2, 0, 2, 2]})
    res = measure_token_reduction(m, digits.val)
    assert [b.block for b in res.blocks] == [0, 2, 3]  # r = 0: no reduction, nothing drawn
    plot_token_reduction(res, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_evit_without_fusion_marks_the_rest_dropped_and_their_attention_zero(micro, digits):
    m = apply_evit(copy.deepcopy(micro), {"keep": 0.5, "at": [1], "fuse": False})
    (b,) = measure_token_reduction(m, digits.val, TokenReductionConfig(n=4)).blocks
    assert (b.status == DROPPED).sum(1).eq(8).all() and (b.status == KEPT).sum(1).eq(8).all()
    res = measure_attention(m, digits.val, AttentionConfig(layers=(3,), heads="all", n=4))
    maps = res.maps[3].flatten(2)  # (images, heads, 16 patches)
    dropped = (b.status == DROPPED)[:, None].expand_as(maps)
    assert maps.shape == (4, 4, 16) and (maps[dropped] == 0).all() and (maps[~dropped] > 0).all()
