"""ExPLoRA: the trainable set is exactly LoRA + the unfrozen block(s) + norms; merging is exact;
stage 1 (MAE on the target domain) writes a plain merged encoder that stage 2 starts from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitkit.adapt import apply_explora, merge_lora, trainable_names
from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.models import create_model
from vitkit.runs import load, save_model

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return create_model("vitkit_micro_p4_16", num_classes=0, global_pool="avg", fc_norm=True).eval()


def _norm_names(m: nn.Module) -> set[str]:
    return {
        f"{n}.{p}"
        for n, mod in m.named_modules()
        if isinstance(mod, nn.LayerNorm)
        for p, _ in mod.named_parameters()
    }


@pytest.mark.parametrize("unfreeze", [[-1], [0, 2]])
def test_trainable_set_is_exactly_lora_unfrozen_blocks_and_norms(unfreeze):
    m = apply_explora(_model(), {"unfreeze_blocks": unfreeze, "rank": 4})
    depth = 4
    open_blocks = {i % depth for i in unfreeze}
    lora = {
        f"blocks.{i}.attn.qkv.lora_{s}_{ab}.weight"
        for i in range(depth)
        if i not in open_blocks
        for s in "qv"
        for ab in "AB"
    }
    blocks = {n for n, _ in m.named_parameters() if any(n.startswith(f"blocks.{i}.") for i in open_blocks)}
    assert trainable_names(m) == lora | blocks | _norm_names(m)
    assert not m.pos_embed.requires_grad and not m.patch_embed.proj.weight.requires_grad


def test_peft_variant_on_the_fused_qkv():
    m = apply_explora(_model(), {"lora": "qkv", "rank": 2})
    lora = {n for n in trainable_names(m) if "lora_" in n}
    assert lora == {f"blocks.{i}.attn.qkv.lora_{ab}.default.weight" for i in range(3) for ab in "AB"}


def test_merge_is_exact_and_stage_two_starts_from_the_merged_weights(tmp_path):
    m = apply_explora(_model(), {"rank": 4})
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    y = m(X)
    merge_lora(m)
    assert (m(X) - y).abs().max() <= 1e-5 and m.vitkit_manifest.transforms == []
    save_model(tmp_path / "merged", m, classes=[])
    assert torch.equal(load(tmp_path / "merged")(X), m(X))


def test_bad_explora_options():
    with pytest.raises(VitkitError, match="unfreeze_blocks"):
        apply_explora(_model(), {"unfreeze_blocks": [9]})
    with pytest.raises(VitkitError, match="unfreeze_blocks"):
        apply_explora(_model(), {"unfreeze_blocks": [0, 1, 2]})


def test_stage_one_writes_a_plain_merged_encoder(mae_run, digits, quick, tmp_path):
    from vitkit.data import DataSplits
    from vitkit.stages.pretrain import explora_pretrain

    shifted = DataSplits(digits.train.subset(range(400)), digits.val.subset(range(200)))
    shifted.train.images = 255 - shifted.train.images
    shifted.val.images = 255 - shifted.val.images
    run = explora_pretrain(mae_run, tmp_path / "ex", quick(epochs=1), {"rank": 2}, data=shifted, quiet=True)
    doc = read_json(run.path / "model.json")
    assert doc["transforms"] == [] and doc["extra"]["pretrain"]["decoder_reused"]
    m = run.metrics
    assert m["encoder_trainable_parameters"] < m["encoder_parameters"] / 2
    enc = load(run.path)
    src = load(mae_run)
    # the frozen patch embedding is untouched, the unfrozen last block moved
    assert torch.equal(enc.patch_embed.proj.weight, src.patch_embed.proj.weight)
    assert not torch.equal(enc.blocks[-1].mlp.fc1.weight, src.blocks[-1].mlp.fc1.weight)
    # LoRA was merged into the other blocks' qkv
    assert not torch.equal(enc.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
