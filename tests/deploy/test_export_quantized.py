"""`vitkit export` of a quantized run writes the real INT8 graph (QDQ ops onnxruntime runs as integer
kernels) and holds it to the quantize rule's stated parity: top-1 agreement and a logit bound."""

from __future__ import annotations

import json

import pytest

from vitkit.cli import main


@pytest.fixture(scope="module")
def quantized_run(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "w8a8"
    assert main(["quantize", str(trained_run), "--preset", "w8a8", "--calib", "64", "-o", str(out)]) == 0
    return out


def test_export_of_a_quantized_run_is_the_int8_graph(quantized_run, capsys, tmp_path):
    import onnx
    import onnxruntime as ort

    assert main(["export", str(quantized_run)]) == 0
    assert "(INT8 graph)" in capsys.readouterr().err  # the console writes to stderr
    doc = json.loads((quantized_run / "export.json").read_text())
    ops = doc["int8_ops"]
    assert ops["QuantizeLinear"] >= 40 and ops["DequantizeLinear"] >= 40  # every calibrated point
    # measured: max logit diff 0.028, agreement 100% (359 images); the rule states 0.25 and 98%
    assert doc["bound"] == 0.25 and doc["max_abs_logit_diff"] <= 0.25
    assert doc["top1_agreement"] >= 0.98 and doc["approximate"]["min_top1_agreement"] == 0.98
    assert abs(doc["top1_onnx"] - doc["top1_pytorch"]) <= 0.02
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(quantized_run / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert fused & {"MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "ConvInteger"}  # integer kernels


def test_a_tighter_bound_or_dynamic_int8_is_one_line(quantized_run, capsys):
    code = main(["export", str(quantized_run), "--bound", "1e-6"])
    err = capsys.readouterr().err
    assert code == 2 and "differ from PyTorch by" in err and "(bound 1e-06)" in err
    code = main(["export", str(quantized_run), "--int8", "dynamic"])
    err = capsys.readouterr().err
    assert code == 2 and "exports as its own INT8 graph (model.onnx); drop --int8" in err


def test_a_quantizer_without_int8_form_refuses_with_its_name(trained_run, tmp_path, capsys):
    out = tmp_path / "repq"
    assert main(["quantize", str(trained_run), "--method", "repq", "--calib", "32", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(out)]) == 2
    err = capsys.readouterr().err
    assert "transform 'quantize' is not exportable: quantizer blocks.0.attn.softmax.output_quantizer" in err
    assert "no INT8 form in onnxruntime" in err and not (out / "model.onnx").exists()
