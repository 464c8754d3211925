"""Quantizing a trained ViT (vitkit_micro_p4_16 on digits): accuracy, save/reload, composition, bad input, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import vitkit
from vitkit.compress.quant import QuantLinear, QuantMatMul, QuantSoftmax, find_points, quantize
from vitkit.errors import VitkitError
from vitkit.models import model_input_size
from vitkit.train import evaluate
from vitkit.train.evaluate import predict


@pytest.fixture(scope="module")
def float_model(trained_run):
    return vitkit.load(trained_run)


@pytest.fixture(scope="module")
def fp_top1(float_model, digits):
    return evaluate(float_model, digits.val)["top1"]


def _q(model, digits, **cfg):
    cfg.setdefault("calib_size", 32)
    return quantize(copy.deepcopy(model), digits.train, **cfg)


def test_points_are_found_by_type_with_all_eight_per_block(float_model):
    assert vitkit.quantize is quantize  # the top-level API name
    pts = find_points(float_model)
    roles = [p.role for p in pts]
    depth = len(float_model.blocks)
    for role in ("qkv", "qk", "softmax", "av", "proj", "fc1", "fc2"):
        assert roles.count(role) == depth
    assert roles.count("patch_embed") == 1 and roles.count("head") == 1
    assert all(p.norm for p in pts if p.role in ("qkv", "fc1"))


def test_w8a8_keeps_accuracy_and_sixteen_bits_is_lossless(float_model, digits, fp_top1):
    q8 = _q(float_model, digits, method="minmax", w_bits=8, a_bits=8)
    assert isinstance(q8.blocks[0].attn.qkv, QuantLinear)
    assert isinstance(q8.blocks[0].attn.softmax, QuantSoftmax)
    assert isinstance(q8.blocks[0].attn.qk_matmul, QuantMatMul)
    assert fp_top1 > 0.85
    assert evaluate(q8, digits.val)["top1"] >= fp_top1 - 0.012  # ≤ 1.2 pt (4 of 359 images)
    q16 = _q(
        float_model, digits, method="minmax", w_bits=16, a_bits=16, patch_embed_a_bits=16, calib_size=128
    )
    p16, p32 = predict(q16, digits.val), predict(float_model, digits.val)
    # static ranges from 128 images can clip a rare larger validation activation: at most 1 of 359
    # predictions may change (0.28 pt); the logits agree closely everywhere
    assert int((p16.argmax(1) != p32.argmax(1)).sum()) <= 1
    assert float((p16 - p32).abs().median()) < 1e-3


def test_w4a4_vit_specific_method_beats_two_bit_floor(float_model, digits, fp_top1):
    q = _q(float_model, digits, method="repq", w_bits=4, a_bits=4)
    assert evaluate(q, digits.val)["top1"] >= fp_top1 - 0.05
    assert q.vitkit_quant_report.reparameterized  # the post-LN reparameterization ran
    q2 = _q(float_model, digits, method="minmax", w_bits=2, a_bits=2)
    assert evaluate(q2, digits.val)["top1"] < fp_top1 - 0.2  # the test can tell broken from working


@pytest.mark.parametrize("method", ["ptq4vit", "ivit"])
def test_saved_and_reloaded_quantized_run_gives_identical_outputs(
    float_model, digits, fp_top1, tmp_path, method
):
    q = _q(float_model, digits, method=method)
    assert evaluate(q, digits.val)["top1"] >= fp_top1 - 0.02
    vitkit.save_model(tmp_path, q, classes=[str(i) for i in range(10)])
    doc = json.loads((tmp_path / "model.json").read_text())
    rec = doc["transforms"][-1]
    assert rec["name"] == "quantize" and rec["config"]["method"] == method
    assert rec["config"]["resolved_bits"]["blocks.0.attn.qkv"] == {"role": "qkv", "a": 8, "w": 8}
    back = vitkit.load(tmp_path)
    x = torch.randn(6, *model_input_size(q))
    with torch.no_grad():
        assert torch.equal(q(x), back(x))


@pytest.mark.slow
def test_reconstruction_lowers_block_error(float_model, digits):
    q = _q(float_model, digits, method="minmax", w_bits=3, a_bits=8, reconstruct=True, recon_iters=10)
    mse = q.vitkit_quant_report.reconstruction_mse
    assert len(mse) == len(float_model.blocks)
    assert all(after < before for before, after in mse.values())


def test_layer_bits_map_is_data_in_the_manifest(float_model, digits):
    q = _q(float_model, digits, method="minmax", layer_bits={"blocks.*.mlp.fc2": 4})
    resolved = q.vitkit_manifest.transforms[-1].config["resolved_bits"]
    assert resolved["blocks.1.mlp.fc2"] == {"role": "fc2", "a": 4, "w": 4}
    assert resolved["blocks.1.mlp.fc1"]["w"] == 8
    assert q.blocks[1].mlp.fc2.weight_quantizer.bits == 4


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_one_line_errors(float_model, digits):
    m = copy.deepcopy(float_model)
    with pytest.raises(VitkitError, match=r"w_bits.*2 to 16"):
        quantize(m, digits.train, w_bits=1)
    with pytest.raises(VitkitError, match=r"a_bits.*2 to 16"):
        quantize(m, digits.train, a_bits=17)
    with pytest.raises(VitkitError, match="fewer than one calibration batch"):
        quantize(m, torch.randn(8, *model_input_size(m)), calib_batch=32)
    with pytest.raises(VitkitError, match=r"shape \(3, 8, 8\) but the model expects \(3, 16, 16\)"):
        quantize(m, torch.randn(64, 3, 8, 8))
    with pytest.raises(VitkitError, match="does not support a_granularity=channel"):
        quantize(m, digits.train, method="adalog", a_granularity="channel")
    with pytest.raises(VitkitError, match="unknown option 'bitz'"):
        quantize(m, digits.train, bitz=3)
    q = _q(float_model, digits, method="minmax")
    with pytest.raises(VitkitError, match="already quantized"):
        quantize(q, digits.train)


def test_cli_quantize_writes_a_loadable_run_and_rejects_bad_bits(trained_run, tmp_path, fp_top1, capsys):
    from vitkit.cli import main

    out = tmp_path / "q"
    code = main(
        [
            "quantize",
            str(trained_run),
            "--preset",
            "w8a8",
            "--calib",
            "64",
            "--deploy",
            "onnx",
            "-o",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "quant.json").read_text())
    assert info["simulated"] is False and info["layers"]["head"]["w"] == 8
    assert (out / "model_int8.onnx").is_file() and info["onnx_vs_simulated_agreement"] >= 0.99
    assert info["quant_top1"] >= fp_top1 - 0.012
    assert isinstance(vitkit.load(out).head, QuantLinear)
    capsys.readouterr()
    code = main(["quantize", str(trained_run), "--w-bits", "17", "-o", str(tmp_path / "b")])
    text = capsys.readouterr().err
    assert code == 2
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "w_bits" in errors[0] and "Traceback" not in text
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_greedy_mixed_precision_beats_reverse_and_uniform_at_equal_budget(float_model, digits):
    from vitkit.compress.quant.mixed import average_bits

    top1, avg = {}, {}
    for strategy in ("greedy", "reverse", "uniform"):
        q = _q(float_model, digits, method="repq", mixed_precision=strategy, avg_bits=3.0, bit_choices=[2, 8])
        layer_bits = q.vitkit_manifest.transforms[-1].config["layer_bits"]  # the allocation is data
        avg[strategy] = average_bits(layer_bits, q)
        top1[strategy] = evaluate(q, digits.val)["top1"]
    assert all(a <= 3.0 + 1e-6 for a in avg.values()) and avg["greedy"] > 2.5
    assert top1["greedy"] >= top1["reverse"] + 0.04
    assert top1["greedy"] >= top1["uniform"] + 0.1
    with pytest.raises(VitkitError, match="within the bit choices"):
        _q(float_model, digits, mixed_precision="greedy", avg_bits=9.0)
    with pytest.raises(VitkitError, match="needs both"):
        _q(float_model, digits, mixed_precision="greedy")


def test_int8_onnx_graph_runs_integer_kernels_and_matches_the_simulated_model(float_model, digits, tmp_path):
    import onnx
    import onnxruntime as ort

    from vitkit.deploy.onnx import OnnxModel
    from vitkit.deploy.qdq import export_int8_onnx
    from vitkit.train.evaluate import eval_transform

    q = _q(float_model, digits, method="minmax", calib_size=64)
    export_int8_onnx(q, tmp_path / "q.onnx", model_input_size(q))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert ops & {"MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "ConvInteger"}  # real INT8 kernels
    x = eval_transform(q).images(digits.val.images)
    got, sim = OnnxModel(tmp_path / "q.onnx")(x), predict(q, digits.val)
    assert float((got.argmax(1) == sim.argmax(1)).float().mean()) >= 0.99
    assert (
        float((got.argmax(1) == digits.val.targets).float().mean()) >= evaluate(q, digits.val)["top1"] - 0.01
    )
    repq = _q(float_model, digits, method="repq")
    with pytest.raises(
        VitkitError, match=r"cannot run quantizer blocks\.0\.attn\.softmax\.output_quantizer \(LogSqrt2"
    ):
        export_int8_onnx(repq, tmp_path / "r.onnx", model_input_size(repq))
    assert not (tmp_path / "r.onnx").exists()


def test_a_tome_merged_model_quantizes_and_reloads(float_model, digits, tmp_path):
    """ToMe blocks pass plain tensors, so calibration reads their inputs like any block's."""
    from vitkit.compress.tokens.tome import ToMeBlock, apply_tome
    from vitkit.models import get_manifest

    tome = apply_tome(copy.deepcopy(float_model), {"r": 2})
    q = _q(tome, digits, method="minmax", w_bits=8, a_bits=8, calib_size=64)
    assert [t.name for t in get_manifest(q).transforms][-2:] == ["tome", "quantize"]
    assert isinstance(q.blocks[1], ToMeBlock) and isinstance(q.blocks[1].attn.qkv, QuantLinear)
    pq, pt = predict(q, digits.val), predict(tome, digits.val)
    # measured: 99.7% top-1 agreement with the float ToMe model, accuracy within 0.3 pt of it
    assert float((pq.argmax(1) == pt.argmax(1)).float().mean()) >= 0.98
    assert evaluate(q, digits.val)["top1"] >= evaluate(tome, digits.val)["top1"] - 0.012
    vitkit.save_model(tmp_path, q, classes=[str(i) for i in range(10)])
    x = torch.randn(4, *model_input_size(q))
    with torch.no_grad():
        assert torch.equal(vitkit.load(tmp_path)(x), q(x))


def test_tokens_can_be_merged_after_quantization_and_the_run_reloads(float_model, digits, fp_top1, tmp_path):
    """The other order: quantize, then ToMe; both transforms replay on load."""
    from vitkit.compress.tokens.tome import apply_tome
    from vitkit.models import get_manifest

    merged = apply_tome(_q(float_model, digits, method="repq", w_bits=8, a_bits=8), {"r": 2})
    assert [t.name for t in get_manifest(merged).transforms][-2:] == ["quantize", "tome"]
    tome_only = apply_tome(copy.deepcopy(float_model), {"r": 2})
    # W8A8 costs little on top of the merging itself (1.2 pt = 4 of 359 images)
    assert evaluate(merged, digits.val)["top1"] >= evaluate(tome_only, digits.val)["top1"] - 0.012
    vitkit.save_model(tmp_path, merged, classes=[str(i) for i in range(10)])
    reloaded = vitkit.load(tmp_path)
    x = torch.randn(4, *model_input_size(merged))
    with torch.no_grad():
        assert torch.equal(merged(x), reloaded(x))
