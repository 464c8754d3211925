"""The demo's promise: a ViT trained from scratch on the embedded digits reaches ≥ 96% on ≥ 300 held-out images."""

from __future__ import annotations

import pytest

from vitkit.demo import run_demo


@pytest.mark.slow
def test_demo_reaches_96_percent(tmp_path):
    summary = run_demo(tmp_path / "demo", quiet=True)
    assert summary["val_images"] >= 300
    assert summary["top1"] >= 0.96, summary
    assert (tmp_path / "demo" / "model.safetensors").is_file()
