"""MAE: patchify, masking, the loss, the decoder's position embedding, prefix tokens, training on
real digits, the encoder written as a plain timm run."""

from __future__ import annotations

import csv

import pytest
import timm
import torch
from safetensors.torch import load_file

from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.models import create_model
from vitkit.pretrain import (
    MAEConfig,
    MaskedAutoencoder,
    masked_patch_loss,
    patchify,
    random_masking,
    unpatchify,
)
from vitkit.pretrain.mae import normalize_patches


@pytest.mark.parametrize("shape,patch", [((2, 3, 16, 16), (4, 4)), ((3, 1, 8, 12), (4, 2))])
def test_patchify_unpatchify_exact_inverse_channel_innermost(shape, patch):
    x = torch.randn(shape)
    p = patchify(x, patch)
    grid = (shape[2] // patch[0], shape[3] // patch[1])
    assert p.shape == (shape[0], grid[0] * grid[1], patch[0] * patch[1] * shape[1])
    assert torch.equal(unpatchify(p, patch, grid), x)
    # patch (row 0, col 1) holds pixels [0:ph, pw:2pw], channel innermost (MAE's 'nhwpqc')
    ph, pw = patch
    expect = x[0, :, :ph, pw : 2 * pw].permute(1, 2, 0).reshape(-1)
    assert torch.equal(p[0, 1], expect)


def test_patchify_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 10, 16), (4, 4))


@pytest.mark.parametrize("length,ratio", [(16, 0.75), (49, 0.75), (196, 0.9), (10, 0.33)])
def test_random_masking_counts_gather_and_inverse(length, ratio):
    x = torch.randn(5, length, 7)
    vis, mask, ids_restore = random_masking(x, ratio, torch.Generator().manual_seed(0))
    keep = int(length * (1 - ratio))
    assert vis.shape == (5, keep, 7)
    assert torch.equal(mask.sum(1), torch.full((5,), float(length - keep)))
    for b in range(5):
        assert torch.equal(torch.sort(ids_restore[b]).values, torch.arange(length))  # a permutation
        kept = torch.nonzero(mask[b] == 0).flatten()
        # the visible tokens are exactly the unmasked ones (in shuffled order)
        assert torch.equal(torch.sort(vis[b], dim=0).values, torch.sort(x[b, kept], dim=0).values)
    # masks differ between samples (per-sample noise)
    assert len({tuple(m.tolist()) for m in mask}) > 1


def test_loss_ignores_predictions_on_visible_patches():
    torch.manual_seed(0)
    target = torch.randn(4, 16, 12)
    pred = torch.randn(4, 16, 12)
    mask = (torch.rand(4, 16) < 0.75).float()
    mask[:, 0] = 1.0
    mask[:, 1] = 0.0
    for norm_pix in (False, True):
        base = masked_patch_loss(pred, target, mask, norm_pix)
        visible_changed = torch.where(mask.bool().unsqueeze(-1), pred, torch.randn_like(pred) * 100)
        assert masked_patch_loss(visible_changed, target, mask, norm_pix) == pytest.approx(
            base.item(), rel=1e-6
        )
        hidden_changed = pred.clone()
        hidden_changed[:, 0] += 1.0
        assert masked_patch_loss(hidden_changed, target, mask, norm_pix) != pytest.approx(
            base.item(), rel=1e-3
        )


def test_norm_pix_target_has_zero_mean_unit_unbiased_std():
    t = normalize_patches(torch.rand(3, 9, 48) * 5 + 2)
    assert torch.allclose(t.mean(-1), torch.zeros(3, 9), atol=1e-5)
    assert torch.allclose(t.std(-1), torch.ones(3, 9), atol=1e-3)


def test_decoder_pos_embed_is_fixed_sincos_regenerated_for_the_grid():
    for img, grid in ((16, 4), (32, 8)):
        enc = create_model("vitkit_nano_p4_16", num_classes=0, img_size=img, global_pool="avg")
        mae = MaskedAutoencoder(enc, MAEConfig(decoder_dim=24, decoder_heads=2))
        pe = mae.decoder_pos_embed
        assert pe.shape == (1, 1 + grid * grid, 24)
        assert torch.equal(pe[0, 0], torch.zeros(24))  # the cls row
        assert pe.abs().max() <= 1.0 and pe[0, 1:].std() > 0.3
        assert "decoder_pos_embed" not in mae.state_dict()  # not learned: regenerated, never saved
        loss, pred, _mask = mae(torch.randn(2, 3, img, img))
        assert pred.shape == (2, grid * grid, 48) and loss.ndim == 0


def test_from_scratch_encoder_gets_mae_init_and_a_frozen_sincos_pos_embed():
    enc = create_model("vitkit_nano_p4_16", num_classes=0, global_pool="avg", fc_norm=True)
    MaskedAutoencoder(enc, MAEConfig(), init_encoder=True)
    assert not enc.pos_embed.requires_grad
    assert torch.equal(enc.pos_embed[0, 0], torch.zeros(32))
    assert torch.equal(enc.blocks[0].attn.qkv.bias, torch.zeros(96))  # xavier + zero bias


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reg_tokens": 2},
        {"reg_tokens": 2, "no_embed_class": True},
        {"class_token": False, "global_pool": "avg"},
    ],
)
def test_all_prefix_tokens_go_through_the_encoder_and_are_dropped_after_decoding(kwargs):
    kw = {"global_pool": "avg", **kwargs}
    enc = create_model("vitkit_nano_p4_16", num_classes=0, **kw)
    mae = MaskedAutoencoder(enc, MAEConfig(mask_ratio=0.75))
    n = enc.num_prefix_tokens
    x = torch.randn(3, 3, 16, 16)
    latent, _mask, ids = mae.forward_encoder(x, 0.75)
    assert latent.shape[1] == n + 4
    pred = mae.forward_decoder(latent, ids)
    assert pred.shape == (3, 16, 48)
    assert mae.decoder_pos_embed.shape[1] == n + 16


def test_mae_refuses_a_model_without_patch_embedding():
    cnn = create_model("resnet10t", num_classes=0)
    with pytest.raises(VitkitError, match="patch_embed"):
        MaskedAutoencoder(cnn)


@pytest.mark.parametrize(
    "values,field",
    [({"mask_ratio": 1.0}, "mask_ratio"), ({"decoder_dim": 30}, "decoder_dim"), ({"oops": 1}, "oops")],
)
def test_bad_mae_config_is_one_line_error(values, field):
    with pytest.raises(VitkitError, match=field) as e:
        MAEConfig.build(**values)
    assert "\n" not in str(e.value)


def test_pretraining_beats_the_mean_baseline_and_writes_a_timm_loadable_encoder(mae_run, digits):
    metrics = read_json(mae_run / "metrics.json")
    # masked-patch loss on held-out digits below predicting the mean patch
    assert metrics["val_loss"] < 0.8 * metrics["val_mean_baseline"]
    rows = list(csv.DictReader((mae_run / "history.csv").read_text().splitlines()))
    assert metrics["val_loss"] < float(rows[0]["val_loss"])  # and it fell while training
    for name in (
        "model.safetensors",
        "model.json",
        "mae_decoder.safetensors",
        "reconstructions.png",
        "config.yaml",
    ):
        assert (mae_run / name).is_file(), name

    doc = read_json(mae_run / "model.json")
    assert doc["task"] == "none" and doc["transforms"] == []
    assert doc["base"]["kwargs"] == {"global_pool": "avg", "fc_norm": True, "num_classes": 0}
    plain = timm.create_model(doc["base"]["name"], **doc["base"]["kwargs"]).eval()
    plain.load_state_dict(load_file(str(mae_run / "model.safetensors")))  # strict: plain timm keys

    from vitkit.runs import load

    model = load(mae_run)
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(model(x), plain(x), atol=1e-6)
    assert model(x).shape == (4, 32)


def test_evaluating_an_encoder_run_without_a_probe_says_what_to_do(mae_run):
    from vitkit.api import evaluate_run

    with pytest.raises(VitkitError, match="--probe"):
        evaluate_run(mae_run)
