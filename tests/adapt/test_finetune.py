"""Fine-tuning from a pretrained run: recipes, layer-wise LR decay scales, labels fraction, a new image
size, PEFT runs that reload, the CLI verbs (trainable vs total printed, bad input exits 2)."""

from __future__ import annotations

import pytest
import torch

from vitkit.adapt.peft import subsample_labels
from vitkit.cli import main
from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.models import create_model
from vitkit.pretrain import MAEConfig, get_recipe
from vitkit.runs import load, save_model
from vitkit.stages.finetune import finetune, finetune_config


def test_layer_decay_scales_for_a_known_depth(mae_run):
    from vitkit.train import build_optimizer

    cfg, recipe, _ = finetune_config(mae_run, {"layer_decay": 0.5}, None, None)
    assert (
        recipe == "mae"
        and cfg.layer_decay == 0.5
        and cfg.model_kwargs == {"global_pool": "avg", "fc_norm": True}
    )
    model = create_model(cfg.model, num_classes=10, **cfg.model_kwargs)  # depth 2
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    # MAE: scale_i = decay^(depth + 1 - layer_id); embeddings are layer 0, blocks.i layer i+1, head last
    assert scale["patch_embed.proj.weight"] == scale["pos_embed"] == scale["cls_token"] == 0.5**3
    assert scale["blocks.0.attn.qkv.weight"] == 0.5**2
    assert scale["blocks.1.mlp.fc2.weight"] == 0.5**1
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0


def test_medical_mae_recipe_is_exactly_the_papers_settings(mae_run):
    rec = get_recipe("medical-mae")
    mae = MAEConfig(**rec.mae)
    assert (mae.mask_ratio, mae.decoder_depth, mae.norm_pix_loss) == (0.9, 2, False)
    assert (rec.pretrain["scale_min"], rec.pretrain["hflip"]) == (0.5, 0.5)
    cfg, _, _ = finetune_config(mae_run, {}, "medical-mae", None)
    assert (cfg.layer_decay, cfg.drop_path, cfg.randaug) == (0.55, 0.2, "rand-m6-mstd0.5-inc1")
    assert (cfg.mixup, cfg.cutmix, cfg.reprob, cfg.weight_decay, cfg.min_lr) == (0.0, 0.0, 0.0, 0.05, 1e-5)
    assert cfg.loss == "auto"  # BCE for multi-hot targets, as the recipe
    with pytest.raises(VitkitError, match="unknown recipe"):
        get_recipe("imagenet")


def test_medical_recipe_fine_tunes_multilabel_data_with_bce_and_reports_mean_auroc(mae_run, tmp_path):
    run = finetune(
        mae_run,
        tmp_path / "med",
        {
            "data": "mosaic:digits",
            "epochs": 2,
            "lr": 3e-3,
            "train_size": 300,
            "val_size": 100,
            "tensorboard": False,
        },
        recipe="medical-mae",
        quiet=True,
    )
    m = run.metrics
    assert m["finetune"]["recipe"] == "medical-mae"
    assert 0.55 < m["mean_auroc"] <= 1.0  # a real (if short) fit: above chance on 2x2 mosaics
    assert read_json(tmp_path / "med" / "model.json")["task"] == "multilabel"


def test_labels_fraction_is_stratified(digits):
    sub = subsample_labels(digits, 0.1, seed=0)
    assert 130 <= len(sub.train) <= 150 and min(sub.train.class_counts()) >= 10
    assert len(sub.val) == len(digits.val)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_labels_fraction_outside_range_exits_2(mae_run, tmp_path, fraction):
    out = tmp_path / "ft"
    assert main(["finetune", str(mae_run), "-o", str(out), "--labels-fraction", str(fraction)]) == 2
    assert not out.exists()


def test_peft_on_a_model_it_cannot_wrap_exits_2(tmp_path, capsys):
    save_model(
        tmp_path / "cnn", create_model("resnet10t", num_classes=10), classes=[str(i) for i in range(10)]
    )
    assert main(["finetune", str(tmp_path / "cnn"), "-o", str(tmp_path / "ft"), "--peft", "vpt-deep"]) == 2
    assert main(["finetune", str(tmp_path / "cnn"), "-o", str(tmp_path / "ft"), "--peft", "lora"]) == 2
    assert main(["finetune", str(tmp_path / "cnn"), "-o", str(tmp_path / "ft"), "--peft", "prefix"]) == 2


def test_a_new_image_size_resamples_the_position_embedding(mae_run, tmp_path):
    run = finetune(
        mae_run,
        tmp_path / "ft32",
        {"img_size": 32, "epochs": 1, "train_size": 200, "val_size": 100, "tensorboard": False},
        quiet=True,
    )
    notes = read_json(tmp_path / "ft32" / "metrics.json")["finetune"]["notes"]
    assert any("resampled from a 4x4 to a 8x8" in n for n in notes)
    model = load(run.path)
    assert model.pos_embed.shape == (1, 1 + 64, 32) and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_resampled_pos_embed_matches_timm_interpolation(mae_run):
    from timm.layers import resample_abs_pos_embed

    from vitkit.adapt.peft import load_pretrained_weights

    src = load(mae_run)
    new = create_model("vitkit_nano_p4_16", num_classes=10, img_size=24, global_pool="avg", fc_norm=True)
    notes = load_pretrained_weights(new, src)
    expect = resample_abs_pos_embed(src.pos_embed, new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(new.pos_embed, expect) and "4x4 to a 6x6" in notes[0]
    assert torch.equal(new.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert new.head.weight.abs().max() < 1e-3  # MAE's fresh head


@pytest.mark.slow
def test_cli_pretrain_finetune_peft_probe_chain(tmp_path, capsys):
    """The issue's CLI tour on real digits: every step prints trainable vs total and writes a run."""
    from vitkit.data import load_splits
    from vitkit.train import evaluate

    runs = tmp_path / "runs"
    common = ["--train-size", "300", "--val-size", "120", "--quiet"]
    assert main(["pretrain", "--model", "vitkit_nano_p4_16", "--data", "digits", "--epochs", "2", "--hflip", "0",
                 "-o", str(runs / "mae"), *common]) == 0  # fmt: skip
    assert "trainable parameters" in capsys.readouterr().err
    assert main(["finetune", str(runs / "mae"), "--data", "digits", "--labels-fraction", "0.5", "--epochs", "1",
                 "-o", str(runs / "ft"), *common]) == 0  # fmt: skip
    assert "trainable parameters" in capsys.readouterr().err
    for peft, extra in (("lora", ["--rank", "2", "--targets", "qkv,fc2"]), ("vpt-deep", ["--num-prompts", "2"]),
                        ("dvpt", ["--bottleneck", "4"]), ("lora-qv", [])):  # fmt: skip
        out = runs / f"peft-{peft}"
        assert (
            main(
                [
                    "finetune",
                    str(runs / "mae"),
                    "--peft",
                    peft,
                    *extra,
                    "--epochs",
                    "1",
                    "-o",
                    str(out),
                    *common,
                ]
            )
            == 0
        )
        err = capsys.readouterr().err
        assert "trainable parameters" in err
        metrics = read_json(out / "metrics.json")
        assert metrics["trainable_parameters"] < 0.35 * metrics["parameters"]
        again = evaluate(load(out), load_splits("digits", val_size=120).val)
        assert again["top1"] == pytest.approx(metrics["top1"], abs=1e-6)
    assert main(["pretrain", "--method", "explora", "--from", str(runs / "mae"), "--epochs", "1",
                 "-o", str(runs / "ex"), *common]) == 0  # fmt: skip
    assert main(["evaluate", str(runs / "ex"), "--probe", "linear"]) == 0
    assert (runs / "ex" / "probe-linear" / "metrics.json").is_file()
    assert main(["evaluate", str(runs / "mae"), "--probe", "knn", "--layer", "0"]) == 0
