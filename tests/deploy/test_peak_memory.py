"""Peak memory of a benchmarked call: non-zero after warm-up, and the size of the activations."""

from __future__ import annotations

import pytest
import torch

from vitkit.deploy.runtimes import Runtime, for_memory, peak_memory_mb

HIDDEN_MB = 512 * 4096 * 4 / 1e6  # one fp32 hidden activation of the MLP below at batch 512: 8.4 MB


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024)
    ).eval()


def test_warm_model_still_shows_its_activations():
    """The benchmark measures after many timed calls: that used to read 0.0 MB."""
    mlp, x = _mlp(), torch.zeros(512, 1024)
    with torch.no_grad():
        for _ in range(5):
            mlp(x)
    peaks = [peak_memory_mb(mlp, x) for _ in range(2)]
    # the Linear output and the ReLU output (8.4 MB each) are alive together; nothing near 100 MB
    assert all(HIDDEN_MB < p < 100 for p in peaks), peaks


def test_peak_grows_with_the_batch():
    from vitkit.models import create_model

    vit = create_model("vitkit_micro_p4_16", num_classes=10).eval()
    small, large = (peak_memory_mb(vit, torch.zeros(b, 3, 16, 16)) for b in (8, 256))
    assert 0 < small < large and large > 5, (small, large)


def test_onnxruntime_measured_without_its_arena(tmp_path):
    pytest.importorskip("onnxruntime")
    from vitkit.deploy.onnx import OnnxModel

    path = tmp_path / "mlp.onnx"
    torch.onnx.export(_mlp(), torch.zeros(1, 1024), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)  # fmt: skip
    session = Runtime(OnnxModel(path, threads=1))
    x = torch.zeros(512, 1024)
    for _ in range(3):
        session(x)  # the arena now holds the call's memory
    fresh = for_memory(session)
    assert fresh is not session and fresh.fn.session.get_session_options().enable_cpu_mem_arena is False
    assert peak_memory_mb(fresh, x) > HIDDEN_MB
