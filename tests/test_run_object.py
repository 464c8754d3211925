"""The Run object: a run directory read once, and new runs derived from it."""

from __future__ import annotations

import pytest
import torch

from vitkit.api import data_splits_for
from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.runs import Run, load


def test_open_reads_what_the_run_holds(trained_run):
    run = Run.open(trained_run)
    model = run.model()
    assert run.model() is model  # built once
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), load(trained_run)(x))
    assert run.config.data == "digits" and run.task in ("multiclass", "classification")
    assert len(run.classes) == 10 and run.transforms == []
    val = run.data("val")
    ref = data_splits_for(run.config, 16).val
    assert torch.equal(val.images, ref.images) and torch.equal(val.targets, ref.targets)
    assert run.fp32_val_metric("top1") == pytest.approx(read_json(trained_run / "metrics.json")["top1"])


def test_derive_writes_a_complete_run_or_nothing(trained_run, tmp_path):
    run = Run.open(trained_run)
    child = run.derive(tmp_path / "child", run.model(), {"top1": 0.5}, {"note.json": {"a": 1}, "x.txt": "hi"})
    assert (child.path / "config.yaml").read_text() == (trained_run / "config.yaml").read_text()
    assert child.metrics == {"top1": 0.5} and read_json(child.path / "note.json") == {"a": 1}
    assert child.classes == run.classes and child.config.data == run.config.data

    def broken(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run.derive(tmp_path / "failed", run.model(), {}, {"plot.png": broken})
    assert not (tmp_path / "failed").exists()
    with pytest.raises(VitkitError, match="is the source run"):
        run.derive(trained_run, run.model(), {})


def test_quantize_reads_the_run_once_and_reuses_its_fp32_accuracy(trained_run, tmp_path, monkeypatch):
    import vitkit.runs as runs
    from vitkit.stages.quantize import quantize_run

    reads: list[str] = []
    original = runs.read_run
    monkeypatch.setattr(runs, "read_run", lambda p: reads.append(str(p)) or original(p))
    summary, out = quantize_run(trained_run, tmp_path / "q", w_bits=8, a_bits=8, calib_size=32)
    assert reads.count(str(trained_run)) == 1  # the source model.json: read once for the whole stage
    assert summary["fp32_top1"] == read_json(trained_run / "metrics.json")["top1"]
    assert Run.open(out).transforms == ["quantize"]
