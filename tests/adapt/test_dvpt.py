"""DVPT (paper reading): identical to the frozen model at initialisation, parameter count formula,
one shared module (one state-dict copy), gradients only on DVPT + head, runs round-trip."""

from __future__ import annotations

import copy

import pytest
import torch

from vitkit.adapt import apply_dvpt, trainable_names
from vitkit.adapt.dvpt import DVPTBlock
from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.runs import load, save_model

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _model(**kw):
    torch.manual_seed(0)
    return create_model("vitkit_micro_p4_16", num_classes=10, **kw).eval()


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 1, "init_values": 0.1}])
def test_at_initialisation_dvpt_equals_the_frozen_model(kw):
    m = _model(**kw)
    y = m(X)
    apply_dvpt(m, {"bottleneck": 8, "num_prompts": 4})
    assert (m(X) - y).abs().max() <= 1e-6
    with torch.no_grad():
        m.dvpt[0].gate.fill_(1.0)
    assert (m(X) - y).abs().max() > 1e-4  # the gate is what keeps it identical


@pytest.mark.parametrize("group_size,n_shared", [(0, 1), (2, 2), (3, 2), (1, 4)])
def test_trainable_count_matches_the_formula(group_size, n_shared):
    d, r, M = 64, 8, 5
    m = apply_dvpt(_model(), {"bottleneck": r, "num_prompts": M, "group_size": group_size})
    assert len(m.dvpt) == n_shared
    dvpt = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and n.startswith("dvpt."))
    assert dvpt == (2 * d * r + r + d + M * r + 1) * n_shared
    assert {n for n in trainable_names(m) if not n.startswith("dvpt.")} == {"head.weight", "head.bias"}
    # the shared module is the same object in every wrapper of its group, stored once
    assert all(isinstance(b, DVPTBlock) for b in m.blocks)
    assert all(b.shared is m.dvpt[i // (group_size or 4)] for i, b in enumerate(m.blocks))
    assert not any(".shared." in k for k in m.state_dict())


def test_gradients_reach_only_dvpt_and_head_and_copies_stay_shared():
    m = apply_dvpt(_model(drop_path_rate=0.3), {"bottleneck": 8, "num_prompts": 4})
    with torch.no_grad():
        m.dvpt[0].gate.fill_(0.5)
    m.train()
    m(X).sum().backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, n
    c = copy.deepcopy(m)  # timm's EMA copies the model: wrappers must follow the copy
    assert all(b.shared is c.dvpt[0] for b in c.blocks)


def test_round_trip_through_a_run(tmp_path):
    m = apply_dvpt(_model(), {"bottleneck": 8, "num_prompts": 4, "group_size": 2})
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    y = m(X)
    save_model(tmp_path / "run", m, classes=[str(i) for i in range(10)])
    assert torch.equal(load(tmp_path / "run")(X), y)


def test_dvpt_on_a_model_it_cannot_wrap_names_the_missing_module():
    with pytest.raises(VitkitError, match="blocks"):
        apply_dvpt(create_model("resnet10t", num_classes=10), {})
    with pytest.raises(VitkitError, match="bottleneck"):
        apply_dvpt(_model(), {"bottleneck": 0})
