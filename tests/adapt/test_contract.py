"""Every adaptation transform leaves a model that still answers timm's feature contract, composes with
vitkit's attention hooks, and can be deep-copied (timm's EMA) without losing its adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from vitkit.adapt import apply_dvpt, apply_explora, apply_lora, apply_lora_qv, apply_vpt
from vitkit.models import attention_maps, create_model

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
TRANSFORMS = {
    "lora": (apply_lora, {"targets": ["qkv", "proj", "fc1", "fc2"]}),
    "lora-qv": (apply_lora_qv, {}),
    "vpt-shallow": (apply_vpt, {"num_prompts": 3}),
    "vpt-deep": (apply_vpt, {"num_prompts": 3, "deep": True}),
    "dvpt": (apply_dvpt, {"group_size": 2}),
    "explora": (apply_explora, {}),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "init_values": 0.1, "qk_norm": True}])
def test_feature_contract_hooks_and_copies(name, kw):
    fn, cfg = TRANSFORMS[name]
    torch.manual_seed(0)
    m = fn(create_model("vitkit_micro_p4_16", num_classes=10, **kw), cfg).eval()
    n = m.num_prefix_tokens
    final, inter = m.forward_intermediates(X, indices=[0, 3], return_prefix_tokens=True, output_fmt="NLC")
    assert [t.shape for t, _ in inter] == [(2, 16, 64)] * 2 and inter[0][1].shape == (2, n, 64)
    assert final.shape == (2, n + 16, 64)
    assert torch.allclose(m.forward_head(final), m(X), atol=1e-6)
    assert m.forward_head(final, pre_logits=True).shape == (2, 64)
    with attention_maps(m, layers=[-1]) as maps:
        m(X)
    assert maps[maps.layers[-1]].shape == (2, 4, n + 16, n + 16)  # prompts are tokens the attention sees
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05)
    twin = copy.deepcopy(m)
    assert torch.equal(twin(X), m(X))
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(0.05)
    assert not torch.equal(twin(X), m(X))  # the copy's adapters are its own
