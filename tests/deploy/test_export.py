"""ONNX export of run directories: parity on real images, the per-transform contract, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitkit.cli import main
from vitkit.deploy import OnnxModel
from vitkit.deploy.export import (
    AS_IS,
    ExportRule,
    not_exportable,
    prepare_for_export,
    prepare_with,
    register_export_rule,
)
from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.models import create_model, model_input_size, record_transform
from vitkit.registry import register_transform, technique, unregister
from vitkit.runs import load, save_model
from vitkit.stages.export import export_run

CLASSES = [str(i) for i in range(10)]


def test_export_run_parity_accuracy_and_int8(exported_run):
    doc = read_json(exported_run / "export.json")
    assert doc["max_abs_logit_diff"] < 1e-4 and doc["bound"] == 1e-4
    assert doc["parity_images"] == 359 and doc["parity_data"] == "digits"  # the run's held-out split
    assert doc["top1_pytorch"] > 0.85 and doc["top1_onnx"] == doc["top1_pytorch"]
    q = doc["int8"]
    assert q["top1_agreement"] >= 0.95 and abs(q["top1"] - doc["top1_pytorch"]) <= 0.03
    assert q["size_bytes"] < 0.6 * doc["size_bytes"]  # INT8 weights: well under the fp32 file
    # dynamic batch: the graph takes any batch size and matches PyTorch on each
    model = load(exported_run)
    ort = OnnxModel(exported_run / "model.onnx", threads=1)
    for b in (1, 5):
        x = torch.randn(b, *model_input_size(model))
        with torch.no_grad():
            assert (ort(x) - model(x)).abs().max() < 1e-4


def _random_run(tmp_path, name: str, **kwargs):
    model = create_model(name, num_classes=10, **kwargs)
    run = tmp_path / name
    save_model(run, model, classes=CLASSES, data={"uri": "digits"})
    return run


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vitkit_nano_p4_16", {}),  # plain
        ("vitkit_micro_distilled_p4_16", {}),  # distilled: cls + dist tokens, two heads
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, reg_tokens=4)),  # registers
        ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, depth=2)),  # LayerScale
    ],
)
def test_export_parity_for_each_model_kind(tmp_path, name, kwargs):
    run = _random_run(tmp_path, name, **kwargs)
    res = export_run(run, data="digits", images=64)
    assert res.doc["max_abs_logit_diff"] < 1e-4
    assert res.doc["top1_onnx"] == res.doc["top1_pytorch"]


class Scale(nn.Module):
    def __init__(self, s: float = 1.0):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, x):
        return x * self.s


def replay_toy_scaled_head(model, config):
    model.head = nn.Sequential(model.head, Scale())
    return record_transform(model, "toy_scaled_head", config) or model


def fold_scale(model):
    """A prepare hook: fold the scale into the head (what LoRA merging does, in miniature)."""
    lin, scale = model.head[0], model.head[1]
    with torch.no_grad():
        lin.weight.mul_(scale.s)
        lin.bias.mul_(scale.s)
    model.head = lin
    return model


@pytest.fixture
def toy_transforms():
    names = ("toy_scaled_head", "toy_unknown", "toy_blocked")
    for n in names:
        register_transform(n, replay_toy_scaled_head)
    register_export_rule("toy_scaled_head", prepare_with(fold_scale))
    register_export_rule("toy_blocked", not_exportable("its custom op has no ONNX symbolic"))
    yield
    for n in names:
        unregister(n)


def _toy_run(tmp_path, transform: str):
    model = create_model("vitkit_nano_p4_16", num_classes=10)
    model = replay_toy_scaled_head(model, {})
    if transform != "toy_scaled_head":
        from vitkit.models import get_manifest

        get_manifest(model).transforms[-1].name = transform
    with torch.no_grad():
        model.head[1].s.fill_(3.0)
    run = tmp_path / transform
    save_model(run, model, classes=CLASSES, data={"uri": "digits"})
    return run


def test_prepare_hook_runs_before_export(tmp_path, toy_transforms):
    run = _toy_run(tmp_path, "toy_scaled_head")
    model = load(run)
    prepared = prepare_for_export(model)
    assert not any(isinstance(m, Scale) for m in prepared.modules())  # folded
    assert any(isinstance(m, Scale) for m in model.modules())  # the run's model is untouched
    res = export_run(run, data="digits", images=32)
    assert res.doc["prepared"] == ["toy_scaled_head"] and res.doc["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize(
    "transform,message",
    [
        (
            "toy_unknown",
            "transform 'toy_unknown' is not exportable: it was registered without an export rule",
        ),
        ("toy_blocked", "transform 'toy_blocked' is not exportable: its custom op has no ONNX symbolic"),
    ],
)
def test_unexportable_transform_is_one_line_exit_2(tmp_path, capsys, toy_transforms, transform, message):
    run = _toy_run(tmp_path, transform)
    code = main(["export", str(run)])
    text = capsys.readouterr()
    err = text.out + text.err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (run / "model.onnx").exists() and not (run / "export.json").exists()


def test_parity_above_bound_fails_and_leaves_nothing(tmp_path):
    run = _random_run(tmp_path, "vitkit_nano_p4_16")
    with pytest.raises(VitkitError, match=r"differ from PyTorch by .*\(bound 1e-12\)"):
        export_run(run, data="digits", images=16, bound=1e-12)
    assert not (run / "model.onnx").exists() and not (run / "export.json").exists()


def test_bad_options(tmp_path):
    run = _random_run(tmp_path, "vitkit_nano_p4_16")
    with pytest.raises(VitkitError, match="--format must be 'onnx'"):
        export_run(run, fmt="tflite")
    with pytest.raises(VitkitError, match="--int8 must be 'dynamic'"):
        export_run(run, int8="static")
    with pytest.raises(VitkitError, match="is not a vitkit run directory"):
        export_run(tmp_path)


def test_rule_table_shapes():
    from vitkit.adapt.lora import merge_lora

    assert ExportRule() == AS_IS and technique("lora").export.prepare is merge_lora
