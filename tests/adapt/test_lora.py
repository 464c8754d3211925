"""LoRA (peft) and LoRA-QV (ours): targets by type, exact trainable sets, merge == unmerged, the
model keeps timm's contract, runs round-trip, and a LoRA fine-tune really adapts a frozen model."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from vitkit.adapt import LoRAQVConfig, apply_lora, apply_lora_qv, merge_lora, trainable_names
from vitkit.adapt.lora import LoRAQVLinear, role_modules
from vitkit.errors import VitkitError
from vitkit.models import create_model
from vitkit.runs import load, save_model

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
CLASSES = [str(i) for i in range(10)]


def _micro():
    torch.manual_seed(0)
    return create_model("vitkit_micro_p4_16", num_classes=10).eval()


def _perturb_trainable(model: nn.Module, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_targets_are_found_by_type_for_each_role():
    m = _micro()
    names = role_modules(m, ["qkv", "fc2"], None)
    assert sorted(names) == sorted(
        [f"blocks.{i}.attn.qkv" for i in range(4)] + [f"blocks.{i}.mlp.fc2" for i in range(4)]
    )
    assert sorted(role_modules(m, ["proj"], [-1])) == ["blocks.3.attn.proj"]


def test_peft_lora_trainable_set_is_exactly_adapters_and_head():
    m = apply_lora(_micro(), {"rank": 4, "targets": ["qkv", "fc1"], "blocks": [0, 2]})
    expect = {
        f"blocks.{i}.{layer}.lora_{ab}.default.weight"
        for i in (0, 2)
        for layer in ("attn.qkv", "mlp.fc1")
        for ab in "AB"
    }
    assert trainable_names(m) == expect | {"head.weight", "head.bias"}
    assert [t.name for t in m.vitkit_manifest.transforms] == ["lora"]


def test_lora_qv_trainable_set_and_k_slice_untouched():
    m = apply_lora_qv(_micro(), LoRAQVConfig(rank=2, train_head=False))
    expect = {f"blocks.{i}.attn.qkv.lora_{s}_{ab}.weight" for i in range(4) for s in "qv" for ab in "AB"}
    assert trainable_names(m) == expect
    _perturb_trainable(m, 0.5)
    qkv: LoRAQVLinear = m.blocks[1].attn.qkv
    h = torch.randn(2, 17, 64)
    out, base = qkv(h), qkv.base_layer(h)
    d = 64
    assert torch.equal(out[..., d : 2 * d], base[..., d : 2 * d])  # K: no update
    assert not torch.allclose(out[..., :d], base[..., :d]) and not torch.allclose(
        out[..., 2 * d :], base[..., 2 * d :]
    )


@pytest.mark.parametrize("kind", ["lora", "lora-qv"])
def test_adapted_model_starts_equal_merges_equal_and_merged_is_plain_timm(kind, tmp_path):
    m = _micro()
    y0 = m(X)
    (apply_lora if kind == "lora" else apply_lora_qv)(m, {"rank": 4, "alpha": 8})
    assert torch.equal(m(X), y0)  # B = 0 at initialisation
    _perturb_trainable(m, 0.1)
    y1 = m(X)
    assert (y1 - y0).abs().max() > 1e-2
    # timm's feature contract still answers
    feats = m.forward_intermediates(X, indices=[1], intermediates_only=True)
    assert feats[0].shape == (4, 64, 4, 4)

    save_model(tmp_path / "run", m, classes=CLASSES)
    reloaded = load(tmp_path / "run")
    assert torch.equal(reloaded(X), y1)  # peft's renamed keys (base_layer, lora_A...) round-trip

    merge_lora(reloaded)
    assert (reloaded(X) - y1).abs().max() <= 1e-5
    assert all(
        type(mod) is nn.Linear
        for n, mod in reloaded.named_modules()
        if n.startswith("blocks.") and n.endswith(("qkv", "proj", "fc1", "fc2"))
    )
    assert reloaded.vitkit_manifest.transforms == []
    plain = timm.create_model("vitkit_micro_p4_16", num_classes=10).eval()
    plain.load_state_dict(reloaded.state_dict())  # strict: the keys of a plain timm model
    assert (plain(X) - y1).abs().max() <= 1e-5


@pytest.mark.parametrize("apply", [apply_lora, apply_lora_qv])
def test_lora_on_a_model_it_cannot_wrap_names_the_missing_module(apply):
    with pytest.raises(VitkitError, match="blocks"):
        apply(create_model("resnet10t", num_classes=10), {})


def test_lora_qv_needs_a_fused_qkv():
    m = _micro()
    m.blocks[2].attn.qkv = nn.Identity()
    with pytest.raises(VitkitError, match=r"fused `qkv`.*blocks\.2\.attn"):
        apply_lora_qv(m, {})


def test_bad_lora_options_are_one_line_errors():
    with pytest.raises(VitkitError, match="targets"):
        apply_lora(_micro(), {"targets": ["query"]})
    with pytest.raises(VitkitError, match="block 7 does not exist"):
        apply_lora_qv(_micro(), {"blocks": [7]})


def test_lora_qv_adapts_a_frozen_classifier_to_inverted_digits(trained_run, digits, quick):
    """Colour-inverted digits wreck the trained classifier; LoRA-QV (4% of the weights, backbone
    frozen) brings it back within two epochs."""
    from vitkit.data import DataSplits
    from vitkit.train import evaluate, fit, weight_checksum

    inverted = DataSplits(
        digits.train.subset(range(len(digits.train))), digits.val.subset(range(len(digits.val)))
    )
    inverted.train.images = 255 - inverted.train.images
    inverted.val.images = 255 - inverted.val.images
    model = load(trained_run)
    before = evaluate(model, inverted.val)["top1"]
    apply_lora_qv(model, {"rank": 4, "alpha": 8})
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    fit(model, inverted, quick(model="vitkit_micro_p4_16", epochs=3, lr=5e-3), quiet=True)
    after = evaluate(model, inverted.val)["top1"]
    assert before < 0.5 and after > before + 0.25, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert weight_checksum(model) != 0
