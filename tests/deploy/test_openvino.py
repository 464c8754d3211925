"""OpenVINO as a deploy back end: vitkit's fp32 graph, its token-reduced graphs and its static INT8
QDQ graph (vitkit's own scales) compile and run in OpenVINO, equal to PyTorch / onnxruntime."""

from __future__ import annotations

import pytest

from vitkit.deploy.onnx import OnnxModel
from vitkit.deploy.openvino import OpenVinoModel, openvino_parity
from vitkit.errors import VitkitError


def _val_images(run, n=128):
    from vitkit.models.inference import eval_transform
    from vitkit.runs import Run

    r = Run.open(run)
    data = r.data("val")
    return eval_transform(r.model()).images(data.images[:n]), data.targets[:n]


def test_fp32_graph_equals_pytorch(exported_run):
    import vitkit

    x, _ = _val_images(exported_run)
    assert openvino_parity(vitkit.load(exported_run), exported_run / "model.onnx", x) < 1e-4


def test_token_reduced_graph_runs(exported_run, tmp_path):
    import vitkit
    from vitkit.stages.compress import reduce_tokens_run
    from vitkit.stages.export import export_run

    reduce_tokens_run(exported_run, tmp_path / "tome", method="tome", r=2)
    export_run(tmp_path / "tome", images=64)
    x, _ = _val_images(exported_run, 64)
    assert openvino_parity(vitkit.load(tmp_path / "tome"), tmp_path / "tome" / "model.onnx", x) < 1e-4


def test_qdq_int8_graph_runs_int8_kernels_on_vitkits_scales(trained_run, tmp_path):
    from vitkit.stages.quantize import quantize_run

    _, q = quantize_run(
        trained_run, tmp_path / "q", {"w_bits": 8, "a_bits": 8, "calib_size": 64}, deploy="onnx"
    )
    ov, ort = OpenVinoModel(q / "model_int8.onnx"), OnnxModel(q / "model_int8.onnx")
    prec = ov.executed_precisions()
    assert prec.get("u8", 0) + prec.get("i8", 0) > 20, prec  # real INT8 layers, not dequantized fp32
    x, y = _val_images(trained_run, 256)
    a, b = ov(x), ort(x)
    assert float((a.argmax(1) == b.argmax(1)).double().mean()) >= 0.97
    assert abs(float((a.argmax(1) == y).double().mean()) - float((b.argmax(1) == y).double().mean())) <= 0.02


def test_bench_times_the_openvino_rows(exported_run):
    from vitkit.deploy.timing import BenchConfig
    from vitkit.stages.bench import bench_run

    doc = bench_run(exported_run, BenchConfig(repeats=1, warmup=1, throughput_batch=8), memory=False)
    assert "openvino fp32" in doc["results"] and doc["results"]["openvino fp32"]["throughput"] > 0


def test_bad_input(tmp_path):
    with pytest.raises(VitkitError, match="does not exist"):
        OpenVinoModel(tmp_path / "missing.onnx")
    with pytest.raises(VitkitError, match="precision must be one of"):
        OpenVinoModel(tmp_path / "missing.onnx", precision="f16")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(VitkitError, match="is not an ONNX model"):
        OpenVinoModel(bad)
