"""VPT shallow/deep: zero prompts == plain model, parameter counts, prefix tokens respected, pooling and
forward_intermediates ignore the prompts, deep prompts act only from their layer on, the backbone stays
in eval while prompts train, runs round-trip."""

from __future__ import annotations

import pytest
import torch

from vitkit.adapt import apply_vpt, trainable_names
from vitkit.adapt.vpt import DeepPromptBlock, PromptTokens
from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.runs import load, save_model

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _model(**kw):
    torch.manual_seed(0)
    return create_model("vitkit_micro_p4_16", num_classes=10, **kw).eval()


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}, {"global_pool": "avg"}])
def test_zero_prompts_is_the_plain_model(deep, kw):
    m = _model(**kw)
    y = m(X)
    apply_vpt(m, {"num_prompts": 0, "deep": deep})
    assert torch.equal(m.eval()(X), y)


@pytest.mark.parametrize("deep,M", [(False, 5), (True, 3)])
def test_trainable_parameters_are_exactly_prompts_and_head(deep, M):
    m = apply_vpt(_model(), {"num_prompts": M, "deep": deep})
    d, depth = 64, 4
    prompt_params = sum(
        p.numel() for n, p in m.named_parameters() if p.requires_grad and not n.startswith("head.")
    )
    assert prompt_params == M * d * (depth if deep else 1)
    expect = {"patch_drop.vpt.prompts", "head.weight", "head.bias"}
    if deep:
        expect |= {f"blocks.{i}.vpt.prompts" for i in range(1, depth)}
    assert trainable_names(m) == expect


def test_prompts_sit_after_all_prefix_tokens_and_pooling_ignores_them():
    m = _model(reg_tokens=2, global_pool="avg")
    apply_vpt(m, {"num_prompts": 4, "deep": True})
    assert m.num_prefix_tokens == 1 + 2 + 4
    assert isinstance(m.patch_drop, PromptTokens) and m.patch_drop.start == 3
    tokens = m.forward_features(X)
    assert tokens.shape == (3, 7 + 16, 64)  # sequence length constant through the blocks
    assert torch.allclose(
        m.forward_head(tokens, pre_logits=True), m.fc_norm(tokens[:, 7:].mean(1)), atol=1e-6
    )
    feats, prefix = m.forward_intermediates(
        X, indices=[3], intermediates_only=True, return_prefix_tokens=True
    )[0]
    assert feats.shape == (3, 64, 4, 4) and prefix.shape == (3, 7, 64)
    # the prompt slot of the output of the last block is not the raw prompt (it went through the blocks)
    assert not torch.allclose(prefix[:, 3:], m.blocks[3].vpt.prompts.expand(3, -1, -1))


def test_deep_prompt_of_layer_i_only_changes_layers_from_i_on():
    m = apply_vpt(_model(), {"num_prompts": 2, "deep": True})
    before = m.forward_intermediates(X, intermediates_only=True, output_fmt="NLC")
    with torch.no_grad():
        m.blocks[2].vpt.prompts.add_(torch.randn(1, 2, 64))  # (a constant shift would vanish in LayerNorm)
    after = m.forward_intermediates(X, intermediates_only=True, output_fmt="NLC")
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.allclose(before[2], after[2]) and not torch.allclose(before[3], after[3])


def test_backbone_stays_in_eval_while_prompts_train():
    m = _model(drop_path_rate=0.5, proj_drop_rate=0.3)
    apply_vpt(m, {"num_prompts": 3, "deep": True})
    m.train()
    y1, y2 = m(X), m(X)
    assert torch.equal(y1, y2)  # no drop-path / dropout in the frozen backbone
    assert m.training and not m.blocks[1].wrapped_block.training and m.blocks[1].vpt.training
    assert m.head.training
    plain = _model(drop_path_rate=0.5, proj_drop_rate=0.3).train()
    assert not torch.equal(plain(X), plain(X))  # (the same model without VPT would differ)
    # gradients reach only the prompts and the head
    m(X).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("deep", [False, True])
def test_round_trip_through_a_run(deep, tmp_path):
    m = apply_vpt(_model(), {"num_prompts": 3, "deep": deep})
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
    y = m(X)
    save_model(tmp_path / "run", m, classes=[str(i) for i in range(10)])
    r = load(tmp_path / "run")
    assert torch.equal(r(X), y)
    assert isinstance(r.blocks[1], DeepPromptBlock) == deep


def test_vpt_on_a_model_it_cannot_wrap_names_the_missing_module():
    with pytest.raises(VitkitError, match="patch_drop"):
        apply_vpt(create_model("resnet10t", num_classes=10), {})
    m = apply_vpt(_model(), {})
    with pytest.raises(VitkitError, match="already"):
        apply_vpt(m, {})
    with pytest.raises(VitkitError, match="dynamic_img_size"):
        apply_vpt(_model(dynamic_img_size=True), {})
    with pytest.raises(VitkitError, match="num_prompts"):
        apply_vpt(_model(), {"num_prompts": -1})
