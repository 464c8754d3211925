"""Quantizing a model that lives on a GPU: every quantizer joins the model's device and the result
matches the same quantization done on the CPU. Skipped where no CUDA GPU is present (CI has none;
a lent GPU machine runs it)."""

from __future__ import annotations

import copy

import pytest
import torch

import vitkit
from vitkit.compress.quant import quantize
from vitkit.compress.quant.config import METHODS, make_config
from vitkit.compress.quant.transform import calibration_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return vitkit.create_model("vitkit_micro_p4_16", num_classes=10).eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_quantize_on_cuda_matches_the_cpu(float_model, digits, method, monkeypatch):
    # fp32 on both devices; restored after the test so the setting does not leak into others
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = dict(method=method, w_bits=8, a_bits=8, calib_size=64)
    on_cpu = quantize(copy.deepcopy(float_model), digits.train, **cfg)
    on_gpu = quantize(copy.deepcopy(float_model).cuda(), digits.train, **cfg)
    assert all(t.is_cuda for t in [*on_gpu.parameters(), *on_gpu.buffers()])
    x = calibration_images(float_model, digits.val, make_config(calib_size=128))
    with torch.no_grad():
        ref, out = on_cpu(x), on_gpu(x.cuda()).cpu()
    # float reductions differ between the devices, so a calibration search may pick a neighbouring
    # candidate; the outputs still agree to a fraction of one 8-bit step
    assert float((out - ref).norm() / ref.norm()) < 1e-2


def test_reconstruction_runs_on_cuda(float_model, digits):
    cfg = dict(method="repq", w_bits=4, a_bits=4, calib_size=64, reconstruct=True, recon_iters=20)
    q = quantize(copy.deepcopy(float_model).cuda(), digits.train, **cfg)
    assert all(t.is_cuda for t in [*q.parameters(), *q.buffers()])
    assert q.vitkit_quant_report.reconstruction_seconds > 0
