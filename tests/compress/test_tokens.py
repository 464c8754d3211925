"""EViT and ToMe: exactness at keep=1 / r=0, invariants of the merge, prefix tokens, reload, accuracy."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vitkit.compress.tokens import (
    EViTBlock,
    KeepRateSchedule,
    ToMeBlock,
    apply_evit,
    apply_tome,
    bipartite_soft_matching,
    scheduled_keep_rate,
)
from vitkit.errors import VitkitError
from vitkit.models import attention_maps, create_model
from vitkit.runs import load, save_model
from vitkit.train import evaluate

# models that exercise every kind of prefix token: cls, cls + dist, cls + 2 registers (+ avg pool),
# and LayerScale + q/k-norm (which the official ToMe patch drops)
PREFIX_MODELS = [
    ("vitkit_micro_p4_16", {}),
    ("vitkit_micro_distilled_p4_16", {}),
    ("vitkit_micro_p4_16", {"reg_tokens": 2, "global_pool": "avg"}),
    ("vitkit_micro_p4_16", {"init_values": 0.1, "qk_norm": True}),
]


def _model(name, kw, seed=0):
    torch.manual_seed(seed)
    return create_model(name, **kw).eval()


@pytest.mark.parametrize("name,kw", PREFIX_MODELS)
def test_identity_settings_equal_the_baseline_exactly(name, kw):
    m = _model(name, kw)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(apply_tome(copy.deepcopy(m), {"r": 0})(x), ref)
        assert torch.equal(apply_evit(copy.deepcopy(m), {"keep": 1.0, "at": [0, 1, 2, 3]})(x), ref)


def test_merge_preserves_the_size_weighted_token_sum():
    g = torch.Generator().manual_seed(1)
    metric, x = torch.randn(4, 15, 8, generator=g), torch.randn(4, 15, 6, generator=g)
    size = torch.randint(1, 5, (4, 15, 1), generator=g).float()
    merge, dest = bipartite_soft_matching(metric, 5)
    y, s = merge(x, size)
    assert y.shape == (4, 10, 6) and s.shape == (4, 10, 1)
    torch.testing.assert_close((y * s).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.sum(1), size.sum(1))
    # every output slot receives at least its own token; the A tokens that merged went to B tokens
    assert (torch.bincount(dest[0], minlength=10) >= 1).all()
    with pytest.raises(VitkitError, match="at most 7"):
        bipartite_soft_matching(metric, 8)


def test_merge_joins_the_most_similar_pair():
    metric = torch.eye(6)[None].clone()
    metric[0, 2] = metric[0, 5]  # token 2 (set A) duplicates token 5 (set B)
    x = torch.arange(6.0)[None, :, None]
    merge, dest = bipartite_soft_matching(metric, 1)
    assert dest[0, 2] == dest[0, 5]
    y, s = merge(x, torch.ones(1, 6, 1))
    assert (y[0, dest[0, 5], 0] == 3.5) and (s[0, dest[0, 5], 0] == 2)


def _block_io(model, block_idx, x):
    """Input and output of block ``block_idx`` (forward hooks)."""
    got = {}
    blk = model.blocks[block_idx]
    h = blk.register_forward_hook(lambda m, i, o: got.update(inp=i[0], out=o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    out = got["out"][0] if isinstance(got["out"], tuple) else got["out"]
    inp = got["inp"][0] if isinstance(got["inp"], tuple) else got["inp"]
    return inp, out


@pytest.mark.parametrize("name,kw", PREFIX_MODELS[:3])
def test_prefix_tokens_are_never_merged_or_dropped(name, kw):
    base = _model(name, kw)
    P = base.num_prefix_tokens
    x = torch.randn(2, 3, 16, 16)
    for reduced, n_out in (
        (apply_tome(copy.deepcopy(base), {"r": [8, 0, 0, 0]}), P + 8),
        (apply_evit(copy.deepcopy(base), {"keep": 0.25, "at": [0]}), P + 4 + 1),
    ):
        inp, out = _block_io(reduced, 0, x)
        assert out.shape[1] == n_out
        # the plain timm block on the same input: prefix tokens see the same attention and MLP
        plain = base.blocks[0]
        with torch.no_grad():
            ref = plain(inp)
        torch.testing.assert_close(out[:, :P], ref[:, :P], rtol=1e-5, atol=1e-6)


def test_tome_token_counts_and_avg_pool_is_size_weighted():
    m = _model("vitkit_micro_p4_16", {"global_pool": "avg", "reg_tokens": 1})
    P = m.num_prefix_tokens
    apply_tome(m, {"r": [4, 2, 1, 1]})
    x = torch.randn(2, 3, 16, 16)
    last = m.blocks[-1]
    last.last = False  # expose the merged state of the last block
    try:
        with torch.no_grad():
            tokens = m.blocks(m.norm_pre(m._pos_embed(m.patch_embed(x))))
        size, _source = last.merge_state.take(tokens)  # the sizes filed under the returned tokens
    finally:
        last.last = True
    assert tokens.shape[1] == P + 16 - 8 and size.sum(1).eq(16).all()
    normed = m.norm(tokens)[:, P:]
    weighted = (normed * size).sum(1) / size.sum(1)
    with torch.no_grad():
        feats = m.forward_features(x)  # the last block unmerges: 16 patch tokens again
    assert feats.shape[1] == P + 16
    torch.testing.assert_close(feats[:, P:].mean(1), weighted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), m.forward_head(feats))


def test_evit_keeps_the_top_k_by_class_attention_and_fuses_the_rest():
    base = _model("vitkit_micro_p4_16", {"reg_tokens": 1})
    P = base.num_prefix_tokens
    m = apply_evit(copy.deepcopy(base), {"keep": 0.5, "at": [1]})
    x = torch.randn(2, 3, 16, 16)
    inp, out = _block_io(m, 1, x)
    blk = base.blocks[1]
    with attention_maps(base, layers=[1]) as maps, torch.no_grad():
        base(x)
    with torch.no_grad():
        h = inp + blk.ls1(blk.attn(blk.norm1(inp)))
    a = maps[1].mean(1)[:, 0, P:]  # class-token attention over non-prefix tokens
    k = math.ceil(0.5 * 16)
    idx = a.topk(k, dim=1).indices
    tokens = h[:, P:]
    kept = torch.stack([tokens[b, idx[b]] for b in range(2)])
    mask = torch.ones_like(a).scatter(1, idx, 0.0)
    fused = (tokens * (a * mask)[..., None]).sum(1, keepdim=True)
    expect = torch.cat([h[:, :P], kept, fused], 1)
    with torch.no_grad():
        expect = expect + blk.ls2(blk.mlp(blk.norm2(expect)))
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_reentrant_and_batch_independent():
    m = apply_tome(_model("vitkit_micro_distilled_p4_16", {}), {"r": 3})
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        a, b = m(x), m(x)
        singles = torch.cat([m(x[i : i + 1]) for i in range(4)])
    assert torch.equal(a, b)
    torch.testing.assert_close(singles, a, rtol=1e-5, atol=1e-5)
    assert all(not blk.attn._taps and not blk.attn._bias_hooks for blk in m.blocks)  # nothing left behind


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_reloads_from_the_manifest(tmp_path, method):
    m = _model("vitkit_micro_p4_16", {})
    m = (
        apply_tome(m, {"r": 2, "prop_attn": False})
        if method == "tome"
        else apply_evit(m, {"keep": 0.6, "at": [1, 3]})
    )
    save_model(tmp_path / "r", m, classes=[str(i) for i in range(10)])
    back = load(tmp_path / "r")
    x = torch.randn(2, 3, 16, 16)
    kind = ToMeBlock if method == "tome" else EViTBlock
    assert any(isinstance(b, kind) for b in back.blocks)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_keep_rate_schedule():
    assert scheduled_keep_rate(0.5, 0.7, start_epochs=1, shrink_epochs=2) == 1.0
    assert scheduled_keep_rate(1.0, 0.7, 1, 2) == 1.0
    assert scheduled_keep_rate(2.0, 0.7, 1, 2) == pytest.approx(0.85)
    assert scheduled_keep_rate(3.0, 0.7, 1, 2) == 0.7
    m = apply_evit(_model("vitkit_nano_p4_16", {}), {"keep": 0.5, "at": [1]})
    from vitkit.train import TrainConfig, TrainContext

    sched = KeepRateSchedule(m, 0.5, 0, 1)
    ctx = TrainContext(m, torch.optim.SGD(m.parameters(), lr=0.1), TrainConfig(epochs=2), steps_per_epoch=2)
    sched.on_epoch_start(ctx, 0)
    rates = []
    for step in range(2):  # what the loop does before each step's forward
        ctx.step = step
        sched.on_step_start(ctx)
        rates.append(sched.current)
        assert all(b.keep_rate == sched.current for b in m.blocks if isinstance(b, EViTBlock))
    assert rates == [1.0, pytest.approx(0.75)]


def test_keep_rate_schedule_runs_per_step_in_the_loop(digits, quick):
    """In fit, the blocks carry the scheduled rate at every step's forward (EViT's per-iteration cosine)."""
    import dataclasses

    from vitkit.compress.tokens.evit import evit_blocks
    from vitkit.train import Callback, fit

    class Seen(Callback):  # runs after the schedule's own on_step_start
        def __init__(self):
            self.rates: list[tuple[float, float]] = []

        def on_step_start(self, ctx):
            self.rates.append((ctx.progress_epochs, evit_blocks(ctx.model)[0].keep_rate))

    data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(256)))
    torch.manual_seed(0)
    m = apply_evit(_model("vitkit_nano_p4_16", {}), {"keep": 0.5, "at": [1]})
    seen = Seen()
    fit(m, data, quick(epochs=2), callbacks=[KeepRateSchedule(m, 0.5, 0.0, 1.5), seen], quiet=True)
    assert [p for p, _ in seen.rates] == [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75]  # 4 steps per epoch
    for progress, rate in seen.rates:
        assert rate == pytest.approx(scheduled_keep_rate(progress, 0.5, 0.0, 1.5))
    assert seen.rates[0][1] == 1.0 and seen.rates[-1][1] == 0.5


def test_bad_inputs():
    m = _model("vitkit_micro_p4_16", {})
    for keep in (0.0, -0.1, 1.5):
        with pytest.raises(VitkitError, match=r"keep rate must be in \(0, 1\]"):
            apply_evit(copy.deepcopy(m), {"keep": keep})
    with pytest.raises(VitkitError, match="outside the model's 4 blocks"):
        apply_evit(copy.deepcopy(m), {"keep": 0.5, "at": [4]})
    # r beyond half the patch tokens left is clamped, as the official code does, with one warning
    with pytest.warns(UserWarning, match=r"clamped .*block 0: 9 -> 8"):
        assert apply_tome(copy.deepcopy(m), {"r": 9}).blocks[0].r == 8
    with pytest.warns(UserWarning, match=r"block 2: 3 -> 2"):  # 16 -> 8 -> 4: the third block has 4 left
        clamped = apply_tome(copy.deepcopy(m), {"r": [8, 4, 3, 0]})
    assert [b.r for b in clamped.blocks] == [8, 4, 2, 0]
    with pytest.raises(VitkitError, match="r must be >= 0"):
        apply_tome(copy.deepcopy(m), {"r": -1})
    with pytest.raises(VitkitError, match="no class token"):
        apply_evit(_model("vitkit_micro_p4_16", {"class_token": False, "global_pool": "avg"}), {"keep": 0.5})
    with pytest.raises(VitkitError, match="already a ToMeBlock"):
        apply_evit(apply_tome(copy.deepcopy(m), {"r": 1}), {"keep": 0.5})


def test_off_the_shelf_accuracy_on_a_trained_model(trained_run, digits):
    model = load(trained_run)
    base = evaluate(model, digits.val)["top1"]
    tome = evaluate(apply_tome(copy.deepcopy(model), {"r": 2}), digits.val)["top1"]
    evit = evaluate(apply_evit(copy.deepcopy(model), {"keep": 0.9}), digits.val)["top1"]
    assert base > 0.85
    # A broken merge or selection (wrong tokens, lost prefix, unweighted pooling) costs far more.
    assert tome >= base - 0.05, (base, tome)
    assert evit >= base - 0.05, (base, evit)


# -- the per-forward state design, checked against the tuple design it replaced ---------------------
class _TupleToMeBlock(ToMeBlock):
    """vitkit's ToMe block before the per-forward state (sizes travelled as an (x, size, source) tuple),
    kept as the reference the current blocks must reproduce (its matching call follows the current
    whole-sequence matching)."""

    def forward(self, x):
        if isinstance(x, tuple):
            x, size, source = x
        else:
            size = source = None
        P = self.num_prefix
        keys, handles = [], []
        if self.r > 0:
            handles.append(self.attn.register_tap(lambda s: keys.append(s.k), needs_probs=False))
        if self.prop_attn and size is not None:
            log_size = torch.cat([size.new_zeros(size.shape[0], P, 1), size.log()], dim=1)
            bias = log_size[:, None, None, :, 0]
            handles.append(self.attn.register_attn_bias(lambda m, q, k: bias))
        try:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        finally:
            for h in handles:
                h.remove()
        if self.r > 0:
            merge, dest = bipartite_soft_matching(keys[0].mean(dim=1), self.r, protected=P)
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1] - P, 1)
            x, size = merge(x, torch.cat([size.new_ones(size.shape[0], P, 1), size], dim=1))
            size, dest = size[:, P:], dest[:, P:] - P
            source = dest if source is None else dest.gather(1, source)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if not self.last:
            return x, size, source
        if self.unmerge and source is not None:
            C = x.shape[-1]
            x = torch.cat([x[:, :P], x[:, P:].gather(1, source[..., None].expand(-1, -1, C))], dim=1)
        return x


@pytest.mark.parametrize("name,kw", PREFIX_MODELS)
@pytest.mark.parametrize(
    "cfg", [{"r": 3}, {"r": [4, 2, 0, 1], "prop_attn": True}, {"r": 2, "prop_attn": False}]
)
def test_per_forward_state_equals_the_tuple_implementation(name, kw, cfg):
    m = apply_tome(_model(name, kw), cfg)
    ref = copy.deepcopy(m)
    for i, blk in enumerate(ref.blocks):
        twin = _TupleToMeBlock(blk, blk.r, blk.num_prefix, blk.prop_attn, blk.last, blk.unmerge)
        ref.blocks[i] = twin
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-5)
    assert len(m.blocks[0].merge_state) == 0  # nothing filed outlives the forward


def test_blocks_pass_plain_tensors_so_forward_intermediates_and_copies_work():
    m = apply_tome(_model("vitkit_micro_p4_16", {"reg_tokens": 1, "global_pool": "avg"}), {"r": [4, 2, 1, 1]})
    P = m.num_prefix_tokens
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, output_fmt="NLC")
        feats = m.forward_features(x)
        logits = m(x)
    assert [t.shape[1] for t in inter] == [16 - 4, 16 - 6, 16 - 7, 16]  # patch tokens; the last unmerges
    torch.testing.assert_close(final, feats, rtol=0, atol=0)
    del final, inter  # sizes stay filed while the tokens they describe are alive, and no longer
    assert len(m.blocks[0].merge_state) == 0
    twin = copy.deepcopy(m)
    assert twin.blocks[0].merge_state is twin.blocks[3].merge_state is not m.blocks[0].merge_state
    with torch.no_grad():
        assert torch.equal(twin(x), logits)
        # a block called on its own starts from unmerged tokens (no sizes carried in from elsewhere)
        h = m.blocks[0](m.norm_pre(m._pos_embed(m.patch_embed(x))))
        assert h.shape[1] == P + 12 and len(m.blocks[0].merge_state) == 1
        assert m.blocks[1](h.clone()).shape[1] == P + 10


def test_keep_rate_schedule_resumes_mid_epoch_exactly(tmp_path, digits, quick):
    """Ctrl-C in the middle of the warm-up, then --resume: the same weights as an uninterrupted run
    (the schedule reads the loop's position, so the resumed steps get the rates they would have had)."""
    import dataclasses
    import os
    import signal

    from vitkit.train import Callback, TrainingInterrupted, fit

    class CtrlCAt(Callback):
        def __init__(self, n):
            self.calls, self.n = 0, n

        def on_step_start(self, ctx):
            self.calls += 1
            if self.calls == self.n:
                os.kill(os.getpid(), signal.SIGINT)

    data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(256)))
    cfg = quick(epochs=2)

    def run(run_dir=None, resume=False, extra=()):
        torch.manual_seed(0)
        m = apply_evit(_model("vitkit_nano_p4_16", {}), {"keep": 0.5, "at": [1]})
        sched = KeepRateSchedule(m, 0.5, 0.0, 1.5)
        return fit(m, data, cfg, run_dir=run_dir, resume=resume, callbacks=[sched, *extra], quiet=True)

    full = run()
    with pytest.raises(TrainingInterrupted) as info:
        run(tmp_path, extra=[CtrlCAt(6)])  # the 2nd step of epoch 2 (4 steps per epoch)
    assert (info.value.epoch, info.value.step) == (1, 2)
    resumed = run(tmp_path, resume=True)
    assert resumed.weight_checksums == full.weight_checksums


# -- the official ToMe, copied, on the same weights ------------------------------------------------------
def _official_bipartite_soft_matching(metric, r, class_token=False, distill_token=False):
    """facebookresearch/ToMe ``tome/merge.py`` ``bipartite_soft_matching`` (merge part), verbatim
    but for the unmerge function this test does not need."""
    protected = 0
    if class_token:
        protected += 1
    if distill_token:
        protected += 1
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode=None: x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def _official_tome_logits(model, x, r, prop_attn=True):
    """The official timm patch (``tome/patch/timm.py``: ToMeAttention, ToMeBlock, merge_wavg) run on
    ``model``'s weights: attention by hand with log(size) added, keys averaged over heads as the
    metric, merge after the attention residual."""
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size = None
    for blk in model.blocks:
        attn, h = blk.attn, blk.norm1(x)
        B, N, C = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = attn.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))
        x = x + out
        if r > 0:
            merge = _official_bipartite_soft_matching(k.mean(1), r, class_token, distill_token)
            size = torch.ones_like(x[..., 0, None]) if size is None else size
            x = merge(x * size, mode="sum")
            size = merge(size, mode="sum")
            x = x / size
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("name", ["vitkit_micro_p4_16", "vitkit_micro_distilled_p4_16"])
@pytest.mark.parametrize("r,prop_attn", [(3, True), (5, False), (8, True)])
def test_tome_equals_the_official_code_on_the_same_weights(name, r, prop_attn):
    """cls and cls + dist models (the official code's two cases, no LayerScale or q/k-norm, which its
    patch drops), token pooling: the logits of vitkit's ToMe and of a copy of the official merge and
    block agree to 1e-5, including an r the official code clamps block by block."""
    base = _model(name, {})
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _official_tome_logits(base, x, r, prop_attn)
    # 16 patch tokens: r = 3 fits every block (16, 13, 10, 7); r = 5 and 8 run out and are clamped
    with pytest.warns(UserWarning, match="clamped") if r > 3 else _no_warning():
        ours = apply_tome(copy.deepcopy(base), {"r": r, "prop_attn": prop_attn})
    with torch.no_grad():
        got = ours(x)
    if isinstance(want, tuple):  # a distilled model in eval mode averages its two heads
        want = (want[0] + want[1]) / 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - base(x)).abs().max() > 1e-3  # the merge changed the outputs: the check has teeth


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield

    return ctx()
