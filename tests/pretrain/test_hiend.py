"""Hi-End-MAE: the decoder matches a re-implementation of the official forward to 1e-5, the default
taps, the LayerNorm target, bad settings as one line, and the CLI from pretraining on canvases to a
segmentation fine-tune on a tenth of the labels."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.models import create_model
from vitkit.pretrain import METHOD_CONFIGS, HiEndMAE, HiEndMAEConfig, MAEConfig, patchify
from vitkit.pretrain.hiend import default_levels

_spec = importlib.util.spec_from_file_location(
    "hiend_reference", Path(__file__).with_name("hiend_reference.py")
)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every weight (LayerNorm affines and biases too) random, so that no term can hide behind 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim > 1 or "norm" not in name else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)


@pytest.mark.parametrize(
    "depth,levels,mask_ratio,norm_pix",
    [(12, None, 0.75, True), (4, [2, 1], 0.75, True), (6, [0, 3, 4], 0.5, True), (4, None, 0.75, False)],
)
def test_matches_the_official_forward_in_shuffled_order(depth, levels, mask_ratio, norm_pix):
    enc = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=0, global_pool="avg"
    )
    cfg = HiEndMAEConfig(
        mask_ratio=mask_ratio, decoder_dim=24, decoder_heads=3, decoder_depth=2, levels=levels
    )
    cfg.norm_pix_loss = norm_pix
    model = cfg.build_model(enc, init_encoder=True).eval()
    _randomise(model, seed=depth)
    assert model.levels == (levels if levels is not None else default_levels(depth))
    imgs = torch.randn(3, 3, 16, 16)
    loss, pred, mask = model(imgs, generator=torch.Generator().manual_seed(7))

    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(7))  # random_masking's draw
    shuffle = torch.argsort(noise, dim=1)
    sd = {**model.state_dict(), "decoder_pos_embed": model.decoder_pos_embed}
    ref_loss, ref_all = reference.official_forward(
        sd, imgs, shuffle, patch=4, mask_ratio=mask_ratio, enc_depth=depth, enc_heads=2, dec_heads=3,
        self_depth=2, levels=model.levels,
    )  # fmt: skip
    ref_pred = ref_all[:, 1:].gather(1, torch.argsort(shuffle, 1)[:, :, None].expand(-1, -1, 48))
    torch.testing.assert_close(pred, ref_pred, rtol=0, atol=1e-5)
    if norm_pix:
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    else:  # the raw-pixel target (an option the official code does not have)
        masked = mask.bool()
        raw = ((pred - patchify(imgs, (4, 4))) ** 2)[masked].mean()
        torch.testing.assert_close(loss, raw, rtol=0, atol=1e-6)
    loss.backward()
    for name in (
        "level_embed.0.weight",
        "cross_blocks.0.cross_attn.kv.weight",
        "encoder.blocks.0.attn.qkv.weight",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name  # every level takes part


@pytest.mark.parametrize(
    "depth,levels", [(12, [9, 6, 3]), (24, [18, 12, 6]), (4, [2, 1]), (3, [2, 1, 0][1:]), (2, [0]), (1, [])]
)
def test_default_levels_scale_the_official_taps_and_skip_the_last_block(depth, levels):
    assert default_levels(depth) == levels


def test_target_is_a_biased_layer_norm_of_each_patch_and_reconstruct_inverts_it():
    model = HiEndMAEConfig().build_model(create_model("vitkit_micro_p4_16", num_classes=0))
    imgs = torch.rand(2, 3, 16, 16)
    t = model.target_patches(imgs)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), rtol=0, atol=1e-5)
    var = t.var(-1, unbiased=False)
    assert torch.all((var - 1).abs() < 1e-3)  # biased variance 1 (MAE's norm_pix_loss: unbiased)
    torch.testing.assert_close(model.reconstruct(imgs, t), imgs, rtol=0, atol=1e-5)


def test_levels_must_be_blocks_of_the_encoder():
    enc = create_model("vitkit_micro_p4_16", num_classes=0)  # 4 blocks
    with pytest.raises(VitkitError, match=r"levels \[7\] are not blocks of a 4-block encoder"):
        HiEndMAEConfig(levels=[7]).build_model(enc)
    one = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(VitkitError, match="at least 2"):
        HiEndMAEConfig().build_model(one)


@pytest.mark.parametrize("levels", [[], [-1], [2, 2]])
def test_bad_levels_are_one_line_errors(levels):
    with pytest.raises(VitkitError, match=r"levels.*must be distinct block indices ≥ 0") as e:
        HiEndMAEConfig.build(levels=levels)
    assert "\n" not in str(e.value)


def test_the_mae_decoder_norms_use_the_official_eps():
    enc = create_model("vitkit_micro_p4_16", num_classes=0)
    for cfg in (MAEConfig(), HiEndMAEConfig()):
        model = cfg.build_model(enc)
        norms = [
            m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and m not in set(enc.modules())
        ]
        assert norms and all(m.eps == 1e-6 for m in norms)  # facebookresearch/mae, Hi-End-MAE: eps 1e-6


def test_a_method_and_settings_of_another_method_are_refused(tmp_path):
    from vitkit.stages.pretrain import pretrain_mae

    cfg = {"model": "vitkit_nano_p4_16", "data": "digits", "epochs": 1}
    with pytest.raises(VitkitError, match="hi-end-mae: its settings are a HiEndMAEConfig, got a MAEConfig"):
        pretrain_mae(cfg, tmp_path / "a", mae=MAEConfig(), method="hi-end-mae", quiet=True)
    with pytest.raises(VitkitError, match="unknown pretraining method 'hiend'"):
        pretrain_mae(cfg, tmp_path / "b", method="hiend", quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_method_table_builds_each_autoencoder():
    enc = create_model("vitkit_micro_p4_16", num_classes=0)
    assert type(METHOD_CONFIGS["mae"]().build_model(enc)).__name__ == "MaskedAutoencoder"
    assert isinstance(METHOD_CONFIGS["hi-end-mae"]().build_model(enc), HiEndMAE)
    assert issubclass(METHOD_CONFIGS["hi-end-mae"], MAEConfig)


def test_the_cli_offers_every_autoencoder_method():
    from typing import get_args

    from vitkit.verbs.adapt import PretrainOptions

    choices = set(get_args(PretrainOptions.model_fields["method"].annotation))
    assert choices == {*METHOD_CONFIGS, "explora"}  # the torch-free verb repeats the names


CANVAS = "canvas:size=32,classes=3,train=96,val=32"


@pytest.fixture(scope="module")
def hiend_run(tmp_path_factory) -> Path:
    from vitkit.cli import main

    out = tmp_path_factory.mktemp("hiend") / "pre"
    # digits, as the MAE fixture: canvases' noisy background makes a normalised-patch target mostly
    # noise at this scale, so the learning check reads digits and the fine-tune reads canvases
    argv = ["pretrain", "--method", "hi-end-mae", "--data", "digits", "--model", "vitkit_nano_p4_16",
            "--epochs", "8", "--lr", "2e-3", "--warmup-epochs", "1", "--scale-min", "0.5", "--quiet",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_cli_pretrains_beats_the_mean_patch_and_records_the_taps(hiend_run):
    metrics = read_json(hiend_run / "metrics.json")
    assert metrics["method"] == "hi-end-mae"
    assert metrics["val_loss"] < 0.8 * metrics["val_mean_baseline"], metrics
    mae = read_json(hiend_run / "model.json")["extra"]["pretrain"]["mae"]
    assert mae["levels"] == [0] and mae["norm_pix_loss"] and mae["decoder_depth"] == 2
    assert (hiend_run / "mae_decoder.safetensors").is_file() and (hiend_run / "reconstructions.png").is_file()


def test_continuing_reuses_the_decoder_only_when_the_taps_match(hiend_run, tmp_path):
    from vitkit.cli import main

    common = ["pretrain", "--from", str(hiend_run), "--data", "digits", "--train-size", "128", "--epochs", "1", "--quiet"]  # fmt: skip
    assert main([*common, "--method", "hi-end-mae", "-o", str(tmp_path / "same")]) == 0
    assert read_json(tmp_path / "same" / "metrics.json")["pretrain"]["decoder_reused"] is True
    assert main([*common, "--method", "hi-end-mae", "--levels", "1", "-o", str(tmp_path / "other")]) == 0
    assert read_json(tmp_path / "other" / "metrics.json")["pretrain"]["decoder_reused"] is False


def test_finetune_a_hiend_encoder_for_segmentation_on_a_tenth_of_the_labels(hiend_run, tmp_path):
    from vitkit.cli import main

    out = tmp_path / "seg"
    argv = ["finetune", str(hiend_run), "--task", "segmentation", "--data", CANVAS, "--labels-fraction", "0.1",
            "--epochs", "2", "--quiet", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.0 < m["miou"] <= 1.0
    assert m["finetune"]["labels_fraction"] == 0.1
    assert 9 <= m["data_description"]["train_size"] <= 10  # about 10% of 96 canvases (class-stratified)
    assert read_json(out / "model.json")["head"]["task"] == "segmentation"


def test_pretraining_says_when_it_shrinks_the_images(capsys, tmp_path):
    from vitkit.cli import main

    argv = [
        "pretrain",
        "--data",
        "canvas:size=64,classes=2,train=8,val=4",
        "--epochs",
        "1",
        "-o",
        str(tmp_path / "p"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert (
        "the 64x64 training images are resized to the encoder's 16x16 input; --img-size 64"
        in out.out + out.err
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--levels", "1"], r"--levels is a Hi-End-MAE option"),
        (["--method", "hi-end-mae", "--levels", "2,x"], r"--levels: expected comma-separated block indices"),
        (["--method", "hi-end-mae", "--levels", "7"], r"levels \[7\] are not blocks of a 4-block encoder"),
        (["--method", "hi-end-mae", "--levels", "-1"], r"levels.*must be distinct block indices ≥ 0"),
    ],
)
def test_bad_levels_on_the_command_line(bad_input, tmp_path, extra, message):
    argv = ["pretrain", "--data", "canvas:size=16,classes=2,train=8,val=4", "--epochs", "1", "--quiet",
            "-o", tmp_path / "out", *extra]  # fmt: skip
    bad_input(argv, message, workdir=tmp_path)
