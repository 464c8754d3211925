"""Wrapped blocks keep timm's ``Block.forward(x, attn_mask, is_causal)``: a mask reaches the attention
exactly as in timm, or a block that changes the number of tokens refuses it with one line."""

from __future__ import annotations

import copy

import pytest
import torch

from vitkit.compress.exits import apply_exits
from vitkit.compress.tokens import apply_evit, apply_tome
from vitkit.errors import VitkitError
from vitkit.models import create_model

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _base():
    torch.manual_seed(0)
    return create_model("vitkit_micro_p4_16", num_classes=10, reg_tokens=1).eval()


def _mask(model) -> torch.Tensor:
    """Boolean (B, 1, N, N) mask: the last three patch tokens are hidden as keys (True = attend)."""
    n = model.num_prefix_tokens + 16
    keep = torch.ones(n, dtype=torch.bool)
    keep[-3:] = False
    return keep.expand(2, 1, n, n)


# block transforms that keep the token count: the mask must change the output exactly as in timm
HONOURING = {
    "exits": lambda m: apply_exits(m, {"exits": [2]}),
    "tome_r0": lambda m: apply_tome(m, {"r": 0}),
    "evit_keep1": lambda m: apply_evit(m, {"keep": 1.0}),
}
REFUSING = {
    "tome": (lambda m: apply_tome(m, {"r": 2}), "ToMe block: got an attention mask"),
    "evit": (lambda m: apply_evit(m, {"keep": 0.5}), "EViT block: got an attention mask"),
}


@pytest.mark.parametrize("name", sorted(HONOURING))
def test_a_mask_reaches_the_attention_as_in_timm(name):
    base = _base()
    m = HONOURING[name](copy.deepcopy(base))
    mask = _mask(base)
    with torch.no_grad():
        ref, got = base.forward_features(X, attn_mask=mask), m.forward_features(X, attn_mask=mask)
        unmasked = base.forward_features(X)
        causal_ref = base.forward_features(X, is_causal=True)
        causal = m.forward_features(X, is_causal=True)
    assert not torch.allclose(ref, unmasked, atol=1e-3)  # the mask matters
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(causal, causal_ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        _, inter = m.forward_intermediates(X, attn_mask=mask, output_fmt="NLC", indices=[1])
        _, inter_ref = base.forward_intermediates(X, attn_mask=mask, output_fmt="NLC", indices=[1])
    torch.testing.assert_close(inter[0], inter_ref[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFUSING))
def test_a_token_reducing_block_refuses_a_mask_instead_of_dropping_it(name):
    fn, message = REFUSING[name]
    m = fn(_base())
    with pytest.raises(VitkitError, match=message + ", which this block cannot honour"):
        m.forward_features(X, attn_mask=_mask(m))
    with pytest.raises(VitkitError, match="got is_causal=True"):
        m.forward_features(X, is_causal=True)
    with torch.no_grad():
        assert m(X).shape == (2, 10)  # without a mask nothing changes
