"""The CLI's bad-input harness (tests/cli/conftest.py), for the pretraining options' bad inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_cli_conftest", Path(__file__).parents[1] / "cli" / "conftest.py"
)
_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli)
bad_input = _cli.bad_input
