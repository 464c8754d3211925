"""PyTorch x86 INT8 back end (PT2E + torchao X86InductorQuantizer + Inductor) on the trained digits model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import vitkit
from vitkit.compress.quant import quantize
from vitkit.compress.quant.config import make_config
from vitkit.compress.quant.transform import calibration_images
from vitkit.errors import VitkitError
from vitkit.train import bf16_is_fast, evaluate
from vitkit.train.evaluate import eval_transform, predict

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def float_model(trained_run):
    return vitkit.load(trained_run).eval()


def _top1(logits, targets) -> float:
    return float((logits.argmax(1) == targets).float().mean())


def test_pt2e_w8a8_keeps_accuracy_agrees_with_simulated_and_reloads(float_model, digits, tmp_path):
    from vitkit.deploy.x86 import load_int8_program, pt2e_int8, save_int8_program

    cfg = make_config(method="minmax", calib_size=128)
    images = calibration_images(float_model, digits.train, cfg)
    program = pt2e_int8(float_model, images)
    # the graph really quantizes the inputs (per tensor) and weights (per channel) of the patch
    # embedding, the 4 linears of each of the 4 blocks and the head (attention matmuls stay float)
    targets = [str(n.target) for n in program.graph.nodes]
    assert targets.count("quantized_decomposed.quantize_per_tensor.default") == 4 * 4 + 2
    assert targets.count("quantized_decomposed.dequantize_per_channel.default") == 4 * 4 + 2
    x = eval_transform(float_model).images(digits.val.images)
    with torch.no_grad():
        got, ref = program(x), float_model(x)
    sim = predict(quantize(copy.deepcopy(float_model), digits.train, cfg), digits.val)
    fp = _top1(ref, digits.val.targets)
    assert _top1(got, digits.val.targets) >= fp - 0.01
    assert float((got.argmax(1) == sim.argmax(1)).float().mean()) >= 0.95
    assert (got - ref).abs().max() > 1e-4  # it is not the float model
    path = save_int8_program(program, tmp_path / "m.pt2", x)
    with torch.no_grad():
        torch.testing.assert_close(load_int8_program(path, compile=False)(x[:5]), got[:5], rtol=0, atol=0)
    with pytest.raises(VitkitError, match="not found"):
        load_int8_program(tmp_path / "missing.pt2")


def test_torch_x86_deploy_refuses_non_int8_configs(trained_run, tmp_path):
    from vitkit.stages.quantize import quantize_run

    with pytest.raises(VitkitError, match="INT8 only"):
        quantize_run(trained_run, tmp_path / "a", deploy="torch-x86", w_bits=4, a_bits=4)
    with pytest.raises(VitkitError, match="torch-x86"):
        quantize_run(trained_run, tmp_path / "b", deploy="tensorrt")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_vitkit_imports_without_torchao():
    code = "import sys, vitkit, vitkit.compress.quant, vitkit.stages.quantize; assert 'torchao' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_cli_deploy_torch_x86_runs_onednn_int8_kernels(trained_run, tmp_path, capsys):
    from vitkit.cli import main

    fp = evaluate(vitkit.load(trained_run), vitkit.data.load_splits("digits").val)["top1"]
    out = tmp_path / "x86"
    code = main(["quantize", str(trained_run), "--preset", "w8a8", "--deploy", "torch-x86", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "quant.json").read_text())
    assert "x86_compile_error" not in info
    assert "qlinear_pointwise" in info["x86_int8_kernels"]  # Inductor lowered to oneDNN INT8 linears
    assert info["x86_int8_top1"] >= fp - 0.01 and info["x86_vs_simulated_agreement"] >= 0.95
    assert (out / "model_int8_x86.pt2").is_file() and info["simulated"] is False
    if bf16_is_fast(torch.device("cpu")):  # int8-mixed-bf16 is measured where bf16 units exist
        assert info["x86_int8_mixed_bf16_top1"] >= fp - 0.015
        assert info["x86_int8_mixed_bf16_vs_simulated_agreement"] >= 0.95
