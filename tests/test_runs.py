"""Run directories: load rebuilds exactly, weights fit plain timm, nothing is unpickled, bad files are named."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.models import create_model, get_manifest, record_transform
from vitkit.registry import register_transform, unregister
from vitkit.runs import load, read_run, save_model


def test_trained_run_has_every_file_and_reloads_identically(trained_run, digits):
    for name in ("model.json", "model.safetensors", "config.yaml", "metrics.json", "history.csv", "checkpoint.pt",
                 "confusion_matrix.png"):  # fmt: skip
        assert (trained_run / name).is_file(), name
    metrics = read_json(trained_run / "metrics.json")
    assert metrics["top1"] > 0.85 and metrics["n"] == len(digits.val)
    assert len((trained_run / "history.csv").read_text().strip().splitlines()) == 1 + 20

    model = load(trained_run)
    assert not model.training and model.vitkit_run.classes == [str(i) for i in range(10)]
    from vitkit.train import evaluate

    again = evaluate(model, digits.val)
    assert again["top1"] == pytest.approx(metrics["top1"], abs=1e-6)


def test_weights_load_into_plain_timm_with_identical_outputs(trained_run):
    model = load(trained_run)
    doc = read_json(trained_run / "model.json")
    plain = timm.create_model(doc["base"]["name"], **doc["base"]["kwargs"]).eval()
    plain.load_state_dict(load_file(str(trained_run / "model.safetensors")))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (plain(x) - model(x)).abs().max() <= 1e-6


def test_load_never_unpickles(trained_run, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load(trained_run) is not None


def test_truncated_weights_and_other_bad_runs_are_named(tmp_path, trained_run):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VitkitError, match=r"model\.safetensors' is truncated or not a safetensors file"):
        load(bad)

    with pytest.raises(VitkitError, match="does not exist"):
        load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitkitError, match="not a vitkit run directory"):
        load(tmp_path / "empty")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(VitkitError, match=r"did not finish training.*--resume"):
        load(incomplete)


def test_mismatched_weights_name_the_tensor(tmp_path, trained_run):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    doc = read_json(other / "model.json")
    doc["base"]["kwargs"]["num_classes"] = 7
    from vitkit.io import write_json

    write_json(other / "model.json", doc)
    with pytest.raises(
        VitkitError, match=r"'head\.(weight|bias)' has shape \(10.*expects \(7.*different number of classes"
    ):
        load(other)


class _Scale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale


def _apply_scale(model, cfg):
    model.fc_norm = _Scale(model.embed_dim)
    record_transform(model, "test_scale", cfg)
    return model


@pytest.fixture
def test_scale_registered():
    register_transform("test_scale", _apply_scale)
    yield
    unregister("test_scale")


def test_transforms_replay_from_the_manifest(tmp_path, test_scale_registered):
    m = _apply_scale(create_model("vitkit_nano_p4_16", num_classes=3), {"why": "test"})
    with torch.no_grad():
        m.fc_norm.scale.mul_(3.0)
    save_model(tmp_path / "r", m, classes=["a", "b", "c"])
    info = read_run(tmp_path / "r")
    assert [t.name for t in info.manifest.transforms] == ["test_scale"]
    back = load(tmp_path / "r")
    assert [t.name for t in get_manifest(back).transforms] == ["test_scale"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), m.eval()(x))

    record_transform(m, "unknown_thing", {})
    save_model(tmp_path / "u", m, classes=["a", "b", "c"])
    with pytest.raises(VitkitError, match="transform 'unknown_thing'"):
        load(tmp_path / "u")
