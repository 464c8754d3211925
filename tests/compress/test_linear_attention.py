"""L²ViT linear attention: equals its explicit form, cost linear in tokens, reload, trains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitkit.compress.linear_attention import (
    LinearAttention,
    apply_linear_attention,
    linear_attention,
    linear_attention_map,
)
from vitkit.errors import VitkitError
from vitkit.models import attention_maps, create_model
from vitkit.runs import load, save_model


def test_kv_first_equals_the_explicit_map():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    t = torch.rand(3, 1, 1, generator=g) + 0.1
    a = F_relu_ref(q, k, v, t)
    torch.testing.assert_close(linear_attention(q, k, v, t), a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear_attention_map(q, k, t) @ v, a, rtol=1e-5, atol=1e-5)


def F_relu_ref(q, k, v, t):
    """The formula written out token by token: τ φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / max(φ(q_i)·Σ_j φ(k_j), 100)."""
    q, k = q.clamp_min(0), k.clamp_min(0)
    num = torch.einsum("bhid,bhjd,bhje->bhie", q, k, v) * t
    den = torch.einsum("bhid,bhjd->bhi", q, k).clamp_min(100.0)[..., None]
    return num / den


def _flops(n_tokens: int, linear: bool) -> int:
    torch.manual_seed(0)
    m = create_model("vitkit_nano_p4_16", embed_dim=32)
    attn = m.blocks[0].attn
    if linear:
        attn = LinearAttention(attn, (1, n_tokens - 1), 1, lcm_kernel=0)
    else:
        attn.force_unfused = True  # FlopCounterMode has no formula for the CPU fused SDPA kernel
    x = torch.randn(1, n_tokens, 32)
    with FlopCounterMode(display=False) as c, torch.no_grad():
        attn(x)
    return c.get_total_flops()


def test_cost_grows_linearly_with_tokens():
    lin = [_flops(n, True) for n in (64, 256, 1024)]
    soft = [_flops(n, False) for n in (64, 256, 1024)]
    assert lin[1] / lin[0] == pytest.approx(4, rel=0.01) and lin[2] / lin[1] == pytest.approx(4, rel=0.01)
    assert soft[2] / soft[1] > 5  # softmax attention: the N² term takes over


def test_swap_keeps_parameters_and_reloads(tmp_path):
    torch.manual_seed(0)
    m = create_model("vitkit_micro_p4_16", reg_tokens=1)
    qkv = m.blocks[1].attn.qkv.weight
    apply_linear_attention(m, {"blocks": [1, 3]})
    assert isinstance(m.blocks[1].attn, LinearAttention) and m.blocks[1].attn.qkv.weight is qkv
    assert type(m.blocks[0].attn).__name__ == "VitkitAttention"
    x = torch.randn(2, 3, 16, 16)
    m.eval()
    with attention_maps(m, layers=[1]) as maps, torch.no_grad():
        y = m(x)
    assert maps[1].shape == (2, 4, 18, 18)
    save_model(tmp_path / "la", m, classes=[str(i) for i in range(10)])
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "la")(x), y)


def test_bad_inputs():
    m = create_model("vitkit_micro_p4_16")
    with pytest.raises(VitkitError, match="has 4 attention layers"):
        apply_linear_attention(copy.deepcopy(m), {"blocks": [4]})
    with pytest.raises(VitkitError, match="odd size"):
        apply_linear_attention(copy.deepcopy(m), {"lcm_kernel": 4})
    la = apply_linear_attention(copy.deepcopy(m), {"blocks": [0]})
    with pytest.raises(VitkitError, match="already LinearAttention"):
        apply_linear_attention(la, {"blocks": [0]})
    la.blocks[0].attn.register_attn_bias(lambda mod, q, k: None)
    with pytest.raises(VitkitError, match="no attention logits"):
        la(torch.randn(1, 3, 16, 16))


@pytest.mark.slow
def test_linear_attention_model_trains(tmp_path, quick):
    from vitkit.stages.train import train_model

    cfg = quick(model="vitkit_micro_p4_16", epochs=8, lr=2e-3, warmup_epochs=1)
    run = train_model(
        cfg.model_copy(update={"transforms": ["linear_attention"]}), tmp_path / "la", quiet=True
    )
    assert run.metrics["top1"] > 0.7, run.metrics["top1"]  # chance: 0.1
