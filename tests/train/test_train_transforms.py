"""``TrainConfig.transforms`` / ``vitkit train --transform``: apply, the loop callbacks, finalize."""

from __future__ import annotations

import pytest
import torch

from vitkit.errors import VitkitError
from vitkit.registry import TrainTransform, parse_transform_spec, register_train_transform, unregister
from vitkit.train import Callback, build_config


def _scaled_head(options: dict[str, str]) -> TrainTransform:
    calls: list[str] = []
    factor = float(options.get("factor", "2"))

    def apply(model):
        calls.append("apply")
        return model

    class _FirstUpdate(Callback):
        def after_optimizer_step(self, ctx):
            if "update" not in calls:
                calls.append("update")

    def callbacks():
        calls.append("callbacks")
        return [_FirstUpdate()]

    def finalize(model):
        calls.append("finalize")
        with torch.no_grad():
            model.head.weight.mul_(factor)
        return model

    t = TrainTransform(apply, callbacks, finalize)
    t.calls = calls  # type: ignore[attr-defined]
    _scaled_head.last = t  # type: ignore[attr-defined]
    return t


@pytest.fixture(autouse=True)
def _scaled_head_registered():
    # registered only while this module's tests run: the registry tests list every registration
    register_train_transform("test_scaled_head", _scaled_head)
    yield
    unregister("test_scaled_head")


def test_parse_transform_spec():
    assert parse_transform_spec("gmm") == ("gmm", {})
    assert parse_transform_spec(" gmm:k=5, form=additive ") == ("gmm", {"k": "5", "form": "additive"})
    with pytest.raises(VitkitError, match="not key=value"):
        parse_transform_spec("gmm:k")


def test_unknown_transform_is_a_config_error():
    with pytest.raises(VitkitError, match="unknown transform 'nope'"):
        build_config(transforms=["nope:x=1"])


def test_train_model_runs_apply_callbacks_finalize(tmp_path, quick):
    from vitkit.api import train_model
    from vitkit.runs import load

    cfg = quick(epochs=1, train_size=128, transforms=["test_scaled_head:factor=0"])
    run = train_model(cfg, tmp_path / "r", quiet=True)
    # the transform's callbacks ran in the loop (after the first optimizer step), before finalize
    assert _scaled_head.last.calls == ["apply", "callbacks", "update", "finalize"]
    # finalize ran before evaluation and saving: a zero head predicts one class everywhere
    assert torch.count_nonzero(load(run.path).head.weight) == 0
    assert run.metrics["top1"] < 0.2


def test_cli_unknown_transform_exits_2(tmp_path, capsys):
    from vitkit.cli import main

    code = main(["train", "--transform", "nope", "-o", str(tmp_path / "r"), "--epochs", "1"])
    assert code == 2
    assert "unknown transform 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
