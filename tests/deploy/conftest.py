"""A trained run exported to ONNX (+ dynamic INT8), copied so the shared ``trained_run`` stays clean."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def exported_run(trained_run, tmp_path_factory) -> Path:
    from vitkit.stages.export import export_run

    run = tmp_path_factory.mktemp("deploy") / "micro"
    shutil.copytree(trained_run, run)
    export_run(run, int8="dynamic", images=400)
    return run
