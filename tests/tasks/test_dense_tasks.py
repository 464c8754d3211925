"""Segmentation and change detection end to end: train on canvases, evaluate, export, quantize; the
metrics against torchmetrics/scikit-learn; the joint augmentation; bad inputs in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkit.errors import VitkitError
from vitkit.tasks import get_task

SEG_DATA = "canvas:size=32,classes=3,train=400,val=100"
CHANGE_DATA = "canvas-change:size=32,classes=3,train=400,val=100"


def _train(out: Path, task: str, data: str, **overrides) -> Path:
    from vitkit.api import train_model
    from vitkit.train import TrainConfig

    cfg = dict(
        model="vitkit_micro_p4_16", img_size=32, task=task, data=data, epochs=8, lr=3e-3, tensorboard=False
    )
    cfg.update(overrides)
    train_model(TrainConfig(**cfg), out, quiet=True)
    return out


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory) -> Path:
    """UperNet over vitkit_micro_p4_16, 8 epochs on 400 canvases of 3 digit classes (~15 s)."""
    return _train(tmp_path_factory.mktemp("dense") / "seg", "segmentation", SEG_DATA)


@pytest.fixture(scope="session")
def change_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("dense") / "change", "change", CHANGE_DATA)


# -- metrics ---------------------------------------------------------------------------------------
def test_segmentation_metrics_match_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    from vitkit.tasks.segmentation import segmentation_metrics

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (6, 9, 9), generator=g)
    preds = torch.where(
        torch.rand(6, 9, 9, generator=g) < 0.6, targets, torch.randint(0, 4, (6, 9, 9), generator=g)
    )
    targets[:, 0] = 255  # ignored row
    preds[:, 0] = 3  # whatever is predicted there does not count
    m = segmentation_metrics(preds, targets, 5)  # class 4 never occurs: left out of the mean
    ref = MulticlassJaccardIndex(5, average="none", ignore_index=255)(preds, targets)
    assert m["per_class_iou"][4] is None
    np.testing.assert_allclose(m["per_class_iou"][:4], ref[:4].numpy(), atol=1e-6)
    assert m["miou"] == pytest.approx(float(ref[:4].mean()), abs=1e-6)
    acc = MulticlassAccuracy(5, average="micro", ignore_index=255)(preds, targets)
    assert m["pixel_accuracy"] == pytest.approx(float(acc), abs=1e-6)
    assert m["pixels"] == 6 * 8 * 9


def test_change_metrics_match_scikit_learn():
    from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

    from vitkit.tasks.change import change_metrics

    g = torch.Generator().manual_seed(1)
    t = (torch.rand(5, 8, 8, generator=g) < 0.2).long()
    p = torch.where(torch.rand(5, 8, 8, generator=g) < 0.8, t, 1 - t)
    m = change_metrics(p, t)
    y, q = t.flatten().numpy(), p.flatten().numpy()
    assert m["change_f1"] == pytest.approx(f1_score(y, q), abs=1e-6)
    assert m["change_precision"] == pytest.approx(precision_score(y, q), abs=1e-6)
    assert m["change_recall"] == pytest.approx(recall_score(y, q), abs=1e-6)
    assert m["change_iou"] == pytest.approx(jaccard_score(y, q), abs=1e-6)


# -- joint augmentation ----------------------------------------------------------------------------
def test_augmentation_moves_image_and_mask_together():
    """Image pixels encode their label (value 40 * label): after crops, shifts and flips the label
    under every interior mask pixel is still the one the image says."""
    from vitkit.data import AugmentConfig, DenseBatchTransform

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 5, (8, 6, 6), generator=g)
    masks = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 48 x 48, 8 px blocks
    images = (masks * 40).to(torch.uint8)[:, None]
    tf = DenseBatchTransform(
        48, 1, (0.0,), (1.0,), train=True, augment=AugmentConfig(scale=(0.4, 1.0), translate=0.2, hflip=0.5)
    )
    x, m = tf(images, masks, torch.Generator().manual_seed(3))
    assert x.shape == (8, 1, 48, 48) and m.shape == (8, 48, 48)
    assert (m == 255).any() and (m != 255).any()  # the shifts pull in unlabelled border pixels
    labelled = m != 255
    # interior: the 3x3 neighbourhood has one label, where bilinear resampling cannot blend two
    pad = torch.nn.functional.pad(m.float()[:, None], (1, 1, 1, 1), mode="replicate")
    nb = pad.unfold(2, 3, 1).unfold(3, 3, 1).reshape(8, 48, 48, 9)
    interior = labelled & (nb == m[..., None].float()).all(-1)
    assert interior.sum() > 2000
    torch.testing.assert_close((x[:, 0] * 255 / 40)[interior], m[interior].float(), rtol=0, atol=0.05)
    # a flip-only transform mirrors image and mask exactly
    flip = DenseBatchTransform(48, 1, (0.0,), (1.0,), train=True, augment=AugmentConfig(hflip=1.0))
    x, m = flip(images, masks, torch.Generator().manual_seed(0))
    assert torch.equal(m, masks.flip(-1))


# -- end to end ------------------------------------------------------------------------------------
def test_segmentation_run_learns_and_writes_overlays(seg_run):
    m = json.loads((seg_run / "metrics.json").read_text())
    # predicting background everywhere scores mIoU ~0.22 and IoU 0 on every digit class
    assert m["miou"] > 0.3, m["miou"]
    assert all(iou > 0.05 for iou in m["per_class_iou"][1:]), m["per_class_iou"]
    assert m["task"] == "segmentation" and m["classes"] == ["background", "0", "1", "2"]
    assert (seg_run / "overlays.png").stat().st_size > 10_000
    doc = json.loads((seg_run / "model.json").read_text())
    assert doc["task"] == "segmentation" and doc["head"]["head"] == "upernet"


def test_evaluate_reproduces_the_training_metrics(seg_run):
    from vitkit.api import evaluate_run

    metrics, out = evaluate_run(seg_run)
    saved = json.loads((seg_run / "metrics.json").read_text())
    for key in ("miou", "pixel_accuracy", "mean_accuracy"):
        assert metrics[key] == pytest.approx(saved[key], abs=1e-6)
    assert (out / "overlays.png").is_file()


def test_segmentation_exports_to_onnx_with_parity(seg_run, tmp_path):
    import shutil

    from vitkit.stages.export import export_run

    run = tmp_path / "run"
    shutil.copytree(seg_run, run)
    doc = export_run(run, images=32).doc
    assert doc["max_abs_logit_diff"] < 1e-4 and doc["top1_agreement"] == 1.0


def test_w8a8_keeps_the_segmentation_quality(seg_run, tmp_path):
    from vitkit.stages.quantize import quantize_run

    summary, out = quantize_run(seg_run, tmp_path / "q", w_bits=8, a_bits=8, calib_size=64)
    assert summary["metric"] == "miou"
    assert abs(summary["drop_points"]) < 2.0, summary  # issue 19 asks for 1 pt; 100 canvases are noisy
    assert json.loads((out / "model.json").read_text())["head"]["task"] == "segmentation"
    # the whole model: the ViT and every convolution of the pyramid and the UperNet decoder
    import vitkit
    from vitkit.compress.quant import QuantConv2d

    float_model, q = vitkit.load(seg_run), vitkit.load(out)
    convs = [n for n, m in float_model.named_modules() if type(m) is torch.nn.Conv2d]
    assert len(convs) > 10 and all(isinstance(q.get_submodule(n), QuantConv2d) for n in convs)


def test_a_run_quantized_before_the_decoder_convs_were_still_loads_them_in_float(seg_run, tmp_path):
    """Runs quantized before the conv points existed recorded only the ViT's points; their replay
    builds exactly those and leaves the decoder in float."""
    import vitkit
    from vitkit.compress.quant import QuantConv2d
    from vitkit.compress.quant.calibrate import calibrate_model
    from vitkit.compress.quant.config import make_config
    from vitkit.compress.quant.points import build_structure, find_points
    from vitkit.compress.quant.transform import _record, calibration_images
    from vitkit.runs import Run

    model = vitkit.load(seg_run)
    cfg = make_config(None, w_bits=8, a_bits=8, calib_size=32)
    old = {p.name for p in find_points(model) if not p.name.startswith(("neck.", "decode_head."))}
    images = calibration_images(model, Run.open(seg_run).splits().train, cfg)
    resolved = build_structure(model, cfg, only=old)
    assert set(resolved) == old
    calibrate_model(model, images, cfg)
    _record(model, cfg, resolved)
    vitkit.save_model(tmp_path, model, classes=Run.open(seg_run).classes)
    back = vitkit.load(tmp_path)
    assert isinstance(back.backbone.blocks[0].attn.qkv, type(model.backbone.blocks[0].attn.qkv))
    assert not any(isinstance(m, QuantConv2d) for m in back.decode_head.modules())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), back(x))


def test_change_run_beats_trivial_predictors_and_exports(change_run, tmp_path):
    import shutil

    from vitkit.stages.export import export_run

    m = json.loads((change_run / "metrics.json").read_text())
    # "changed everywhere" scores F1 ~0.16 here, "unchanged everywhere" 0
    assert m["change_f1"] > 0.4, m
    assert m["task"] == "change"
    run = tmp_path / "run"
    shutil.copytree(change_run, run)
    doc = export_run(run, images=16).doc
    assert doc["input_shape"] == [6, 32, 32] and doc["max_abs_logit_diff"] < 1e-4


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "segmentation", "--data", "digits"], "task 'segmentation' cannot train on 'digits'"),
        (["--task", "classification", "--data", "canvas"], "cannot train on 'canvas'"),
        (["--task", "change", "--data", "canvas"], "task 'change' cannot train on 'canvas'"),
        (["--head", "linear", "--data", "digits"], "--head linear is for dense tasks"),
        (
            ["--task", "segmentation", "--data", "canvas:size=16", "--mixup", "0.2"],
            "--mixup is for image labels",
        ),
        (["--task", "segmentation:pyramid=fpn", "--data", "canvas"], "pyramid"),
        (
            ["--task", "segmentation", "--data", "canvas:size=16,train=20,val=4", "--transform", "gmm:k=3"],
            "no --transform",
        ),
    ],
)
def test_bad_dense_options_fail_in_one_line(bad_input, tmp_path, argv, message):
    bad_input(["train", *argv, "--epochs", "1", "-o", tmp_path / "out"], message, workdir=tmp_path)


def test_dense_tasks_are_registered_with_their_contract():
    seg, change = get_task("segmentation"), get_task("change:head=linear")
    assert seg.dense and change.dense and change.spec == "change:head=linear"
    assert seg.quality_key == "miou" and change.quality_key == "change_f1"
    with pytest.raises(VitkitError, match="head"):
        get_task("segmentation:head=maskformer")


@pytest.mark.slow
def test_changevit_learns_change_masks(tmp_path):
    """ChangeViT (small detail CNN) with its BCE + Dice loss, on the same pairs as the baseline."""
    out = _train(tmp_path / "cvit", "change:head=changevit,detail_width=8", CHANGE_DATA)
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "change:detail_width=8,head=changevit"
    assert m["change_f1"] > 0.4, m["change_f1"]
    doc = json.loads((out / "model.json").read_text())
    assert doc["head"]["head"] == "changevit" and doc["head"]["detail_channels"] == [8, 16, 32]


def test_report_shows_the_dense_run(seg_run, tmp_path):
    from vitkit.stages.report import build_report

    text, _ = build_report([seg_run])
    m = json.loads((seg_run / "metrics.json").read_text())
    assert "<th>miou</th>" in text  # the summary column is the task's quality metric
    assert f"miou {m['miou']:.4f}" in text
    assert "segmentation head</td><td>upernet" in text  # the lineage shows the head
    assert "overlays: image, truth, prediction" in text and text.count("data:image/png;base64") >= 3


def test_finetune_puts_a_pretrained_encoder_under_the_dense_head(mae_run, tmp_path):
    """MAE encoder (digits, 16 px) -> segmentation on 32 px canvases: the blocks start from the MAE
    weights (the position embedding resampled), the head is new; the recipe's mixup/RandAugment are
    dropped for masks."""
    import vitkit
    from vitkit.stages.finetune import finetune

    run = finetune(
        mae_run,
        tmp_path / "ft",
        {
            "task": "segmentation",
            "data": "canvas:size=32,classes=3,train=64,val=16",
            "img_size": 32,
            "epochs": 1,
            "lr": 1e-12,
            "warmup_epochs": 0,
            "tensorboard": False,
        },
        quiet=True,
    )
    model, mae = vitkit.load(run.path), vitkit.load(mae_run)
    assert json.loads((run.path / "model.json").read_text())["head"]["task"] == "segmentation"
    got, want = model.backbone.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # lr 1e-12: still the MAE weights
    cfg = (run.path / "config.yaml").read_text()
    assert "mixup: 0.0" in cfg and "randaug: null" in cfg


def test_dense_models_run_at_the_data_size_unless_told(tmp_path):
    """No --img-size: the micro preset (16 px) is built at the canvases' 32 px, and config.yaml says so."""
    out = _train(
        tmp_path / "s", "segmentation", "canvas:size=32,classes=2,train=16,val=8", epochs=1, img_size=None
    )
    doc = json.loads((out / "model.json").read_text())
    assert doc["base"]["kwargs"]["img_size"] == 32
    assert "img_size: 32" in (out / "config.yaml").read_text()


# -- ViT-P over the segmentation run (issue 19 part 5) ----------------------------------------------------
@pytest.fixture(scope="session")
def vitp_run(seg_run, tmp_path_factory) -> Path:
    """ViT-P fine-tuned over seg_run's frozen segmenter, its ViT from seg_run's backbone (~20 s)."""
    from vitkit.api import finetune

    out = tmp_path_factory.mktemp("dense") / "vitp"
    train = dict(task="segmentation", head="vitp", data=SEG_DATA, epochs=8, lr=3e-3, tensorboard=False)
    finetune(seg_run, out, train, recipe="none", quiet=True)
    return out


def test_vitp_learns_points_over_a_frozen_stage1_and_reloads(vitp_run, seg_run):
    import csv

    import vitkit
    from vitkit.api import evaluate_run
    from vitkit.models.vitp import ViTPSegmenter

    doc = json.loads((vitp_run / "model.json").read_text())
    seg_doc = json.loads((seg_run / "model.json").read_text())
    assert doc["head"]["head"] == "vitp" and doc["head"]["alpha"] == 0.4 and doc["head"]["points"] == 32
    assert doc["head"]["stage1"] == seg_doc["head"]
    m = json.loads((vitp_run / "metrics.json").read_text())
    seg_m = json.loads((seg_run / "metrics.json").read_text())
    assert m["stage1_miou"] == seg_m["miou"]
    # fusion at the paper's alpha keeps stage 1's quality (the regions are stage 1's; ViT-P votes on classes)
    assert m["miou"] > seg_m["miou"] - 0.03, (m["miou"], seg_m["miou"])
    with open(vitp_run / "history.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last["val_point_accuracy"]) > 0.4, last  # 4 classes (background + 3 digits): chance 0.25

    model, stage1 = vitkit.load(vitp_run), vitkit.load(seg_run)
    assert isinstance(model, ViTPSegmenter)
    for name, value in stage1.state_dict().items():  # stage 1 is frozen: the source run's weights exactly
        assert torch.equal(model.stage1.state_dict()[name], value), name
    metrics, _ = evaluate_run(vitp_run)
    assert metrics["miou"] == pytest.approx(m["miou"], abs=1e-6)


def test_vitp_at_alpha_zero_reproduces_its_stage1(seg_run):
    """alpha 0 fuses stage 1's classes alone: every region keeps its class (its pixels' argmax is its mean's
    argmax) and the semantic inference gives back stage 1's label map, whatever ViT-P says."""
    import vitkit
    from vitkit.models import create_model
    from vitkit.models.vitp import attach_vitp_head, vitp_head_config

    stage1 = vitkit.load(seg_run).eval()
    vit = create_model("vitkit_micro_p4_16", num_classes=stage1.num_classes, img_size=32)
    model = attach_vitp_head(vit, vitp_head_config(stage1, points=8, alpha=0.0), stage1=stage1).eval()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = stage1(x).argmax(1)
        got = model(x).argmax(1)
    assert (got == want).float().mean() > 0.995


def test_segmenter_proposals_tile_the_label_map():
    from vitkit.models.vitp import mask_argmax_points, segmenter_proposals

    logits = torch.randn(4, 12, 12, generator=torch.Generator().manual_seed(0))
    logits = torch.nn.functional.avg_pool2d(logits[None], 3, 1, 1)[0]  # smoother regions
    proposals, in_logits = segmenter_proposals(logits)
    label = logits.argmax(0)
    assert torch.equal(proposals.masks.sum(0), torch.ones(12, 12, dtype=torch.long))  # disjoint, cover all
    for mask, lab, cls in zip(proposals.masks, proposals.labels, in_logits):
        assert (label[mask] == lab).all() and int(cls[:-1].argmax()) == int(lab)
        mean = logits.softmax(0)[:, mask].mean(1)
        assert torch.allclose(cls[:-1].exp(), mean, atol=1e-6)
    assert (in_logits.softmax(-1)[:, -1] < 1e-9).all()  # no void: the regions tile the image
    rows, cols = ((mask_argmax_points(proposals.mask_logits) + 1) / 2 * 12).round().long().T
    assert proposals.masks[torch.arange(len(rows)), rows, cols].all()  # each point lies in its region


def test_vitp_cannot_export_and_needs_a_segmentation_run(vitp_run, change_run, bad_input, tmp_path):
    TRAIN = ["train", "--head", "vitp", "--model", "vitkit_micro_p4_16", "--epochs", "1"]
    bad_input(["export", vitp_run], r"not exportable: ViT-P's two-stage inference")
    bad_input(
        [*TRAIN, "--task", "segmentation", "--data", SEG_DATA, "-o", tmp_path / "a"],
        r"head vitp reclassifies the regions of a trained segmentation run",
        workdir=tmp_path,
    )
    bad_input(
        [
            "finetune",
            change_run,
            "--task",
            "segmentation",
            "--head",
            "vitp",
            "--data",
            SEG_DATA,
            "-o",
            tmp_path / "b",
        ],
        r"--head vitp fine-tunes from a one-stage segmentation run",
        workdir=tmp_path,
    )
    bad_input(
        [*TRAIN, "--task", "change", "--data", CHANGE_DATA, "-o", tmp_path / "c"],
        r"--head",
        workdir=tmp_path,
    )
