"""Bad inputs that try to make vitkit open other files or run code (issue 25, item 1).

A run's ``model.json`` ``base.kwargs`` go to ``timm.create_model``; timm also takes arguments that
read local files (``checkpoint_path``, ``pretrained`` + ``pretrained_cfg_overlay={"file": ...}``,
``pretrained_cfg``). A tampered run must be refused in one line naming model.json and the field, and
the file it names must not be opened. "Opened" is observed with a Python audit hook on ``open``
(torch.load opens ``.pth`` files through it); the control test shows the hook sees timm open the
file when the same kwargs bypass the run check.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import vitkit
from vitkit.io import read_json, write_json
from vitkit.runs import save_model

SECRET = "vitkit-secret-weights.pth"
_OPENED: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # cheap filter: only record opens of the decoy file (audit hooks see every open of the session)
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        name = os.fsdecode(args[0])
        if SECRET in name:
            _OPENED.append(name)


sys.addaudithook(_audit)  # hooks cannot be removed; this one only appends for the decoy's name


@pytest.fixture(scope="module")
def genuine_run(tmp_path_factory) -> Path:
    """An untrained vitkit_nano_p4_16 run (no training needed: the refusal comes before the weights)."""
    run = tmp_path_factory.mktemp("sec") / "run"
    torch.manual_seed(0)
    model = vitkit.create_model("vitkit_nano_p4_16", num_classes=10, img_size=16)
    save_model(run, model, classes=[str(i) for i in range(10)], data={"uri": "digits"})
    return run


@pytest.fixture
def secret(tmp_path, genuine_run) -> Path:
    """A weights file the attacker wants vitkit to read (loadable: the same model's state dict)."""
    path = tmp_path / SECRET
    torch.save(vitkit.load(genuine_run).state_dict(), path)
    return path


def _tampered(genuine_run: Path, tmp_path: Path, kwargs: Any) -> Path:
    import shutil

    run = tmp_path / "tampered"
    shutil.copytree(genuine_run, run)
    doc = read_json(run / "model.json")
    if isinstance(kwargs, dict):
        doc["base"]["kwargs"].update(kwargs)
    else:
        doc["base"]["kwargs"] = kwargs
    write_json(run / "model.json", doc)
    return run


# (case, base.kwargs change with "SECRET" replaced by the decoy path, expected error line)
ROWS = [
    (
        "checkpoint_path",
        {"checkpoint_path": "SECRET"},
        r"model\.json: base\.kwargs 'checkpoint_path' is not an allowed",
    ),
    (
        "pretrained file overlay",
        {"pretrained": True, "pretrained_cfg_overlay": {"file": "SECRET"}},
        r"model\.json: base\.kwargs 'pretrained' is not an allowed model argument \(allowed: .*num_classes",
    ),
    (
        "overlay file alone",
        {"pretrained_cfg_overlay": {"file": "SECRET", "input_size": [3, 16, 16]}},
        r"model\.json: base\.kwargs 'pretrained_cfg_overlay' may only set .*input_size.* with plain values \(got file\)",
    ),
    (
        "pretrained_cfg",
        {"pretrained_cfg": {"file": "SECRET"}},
        r"base\.kwargs 'pretrained_cfg' is not an allowed",
    ),
    ("cache_dir", {"cache_dir": "SECRET"}, r"base\.kwargs 'cache_dir' is not an allowed"),
    (
        "object value",
        {"img_size": {"file": "SECRET"}},
        r"base\.kwargs 'img_size' must be a number, string, boolean or list",
    ),
    ("kwargs not an object", ["SECRET"], r"model\.json: base\.kwargs must be an object"),
]


def _fill(value: Any, secret: Path) -> Any:
    if value == "SECRET":
        return str(secret)
    if isinstance(value, dict):
        return {k: _fill(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, secret) for v in value]
    return value


@pytest.mark.parametrize(("case", "kwargs", "message"), ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.parametrize("command", ["evaluate", "quantize"])
def test_tampered_model_json_refused_without_opening_the_file(
    bad_input, genuine_run, secret, tmp_path, case, kwargs, message, command
):
    run = _tampered(genuine_run, tmp_path, _fill(kwargs, secret))
    argv = (
        ["evaluate", run, "--data", "digits"]
        if command == "evaluate"
        else ["quantize", run, "-o", tmp_path / "q"]
    )
    _OPENED.clear()
    bad_input(argv, message, workdir=tmp_path)
    assert not _OPENED, f"{case}: vitkit opened {_OPENED}"


def test_control_timm_opens_the_file_when_kwargs_bypass_the_check(genuine_run, secret):
    """What the refusal prevents: the same kwargs given straight to create_model make timm read it."""
    _OPENED.clear()
    model = vitkit.create_model("vitkit_nano_p4_16", num_classes=10, img_size=16, checkpoint_path=str(secret))
    assert [str(secret)] == _OPENED
    ref = torch.load(secret, weights_only=True)
    torch.testing.assert_close(model.state_dict()["head.weight"], ref["head.weight"])


def test_genuine_and_input_size_overlay_runs_still_load(genuine_run, tmp_path):
    """The allow-list keeps what vitkit writes and the input-description overlay bench/analysis.py uses."""
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = vitkit.load(genuine_run)(x)
        run = _tampered(genuine_run, tmp_path, {"pretrained_cfg_overlay": {"input_size": [3, 16, 16]}})
        torch.testing.assert_close(vitkit.load(run)(x), want)


TRAIN_ROWS = [
    (
        "checkpoint_path",
        "{checkpoint_path: SECRET}",
        r"c\.yaml: field 'model_kwargs': model_kwargs 'checkpoint_path' is not an allowed",
    ),
    (
        "overlay file",
        "{pretrained_cfg_overlay: {file: SECRET}}",
        r"c\.yaml: field 'model_kwargs': .*may only set",
    ),
]


@pytest.mark.parametrize(("case", "kwargs", "message"), TRAIN_ROWS, ids=[r[0] for r in TRAIN_ROWS])
def test_train_config_model_kwargs_refused_before_training(
    bad_input, secret, tmp_path, case, kwargs, message
):
    """A config cannot produce a run that vitkit.load would refuse (or make timm read a file)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: vitkit_nano_p4_16\nepochs: 1\nmodel_kwargs: {kwargs.replace('SECRET', str(secret))}\n"
    )
    _OPENED.clear()
    bad_input(["train", "--config", cfg, "--quiet", "-o", tmp_path / "r"], message, workdir=tmp_path)
    assert not _OPENED, f"{case}: vitkit opened {_OPENED}"


def _onnx_with_external_data(path: Path, location: str) -> None:
    """A one-Add ONNX graph whose initializer is read from ``location`` (external data)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


ONNX_ROWS = [("parent folder", "../SECRET"), ("absolute path", "SECRET_ABS"), ("symbolic link", "link.bin")]


@pytest.mark.parametrize(("case", "location"), ONNX_ROWS, ids=[r[0] for r in ONNX_ROWS])
def test_onnx_external_data_outside_the_run_refused(bad_input, genuine_run, tmp_path, case, location):
    """``vitkit bench RUN`` times RUN/model.onnx: its external data must stay inside RUN."""
    import shutil

    pytest.importorskip("onnxruntime")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(16))
    run = tmp_path / "run"
    shutil.copytree(genuine_run, run)
    (run / "link.bin").symlink_to(secret)
    location = location.replace("SECRET_ABS", str(secret)).replace("SECRET", "secret.bin")
    _onnx_with_external_data(run / "model.onnx", location)
    argv = ["bench", run, "--no-save", "--no-baseline", "--no-memory", "--repeats", "1", "--batch", "2",
            "--latency-calls", "1"]  # fmt: skip
    bad_input(argv, rf"model\.onnx': initializer 'w' has external data at '{re.escape(location)}', expected a file inside",
              workdir=tmp_path)  # fmt: skip


def test_onnx_external_data_inside_the_folder_loads(tmp_path):
    import numpy as np

    pytest.importorskip("onnxruntime")
    from vitkit.deploy.onnx import OnnxModel

    np.arange(4, dtype=np.float32).tofile(tmp_path / "w.bin")
    _onnx_with_external_data(tmp_path / "m.onnx", "w.bin")
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx")(torch.ones(4)), torch.arange(4.0) + 1)


class _Touch:
    """Unpickling it creates ``path``: what a hostile checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("command", ["train", "distill"])
def test_pickle_payload_pretrained_file_refused_without_running(bad_input, tmp_path, command):
    """--pretrained-file / --teacher-weights .pth files are read with weights_only=True only."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Touch(marker)}, evil)
    if command == "train":
        argv = ["train", "--model", "vit_tiny_patch16_224", "--img-size", "16", "--epochs", "1",
                "--pretrained-file", evil, "--quiet", "-o", tmp_path / "r"]  # fmt: skip
    else:
        argv = ["distill", "--teacher", "vit_tiny_patch16_224", "--teacher-weights", evil,
                "--student", "vitkit_micro_distilled_p4_16", "--quiet", "-o", tmp_path / "r"]  # fmt: skip
    # The output folder is created (empty) before the model is built: a known gap of the train and
    # distill commands' ordering, reported separately (issue 25); here it must at least stay empty.
    bad_input(
        argv, r"cannot read pretrained file '.*evil\.pth'.*weights_only", workdir=tmp_path, allowed=["r"]
    )
    assert not marker.exists()
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
