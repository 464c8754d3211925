"""Training progress: time left for the whole run, and no ``loss nan`` before the first step."""

from __future__ import annotations

import io
import re

from rich.console import Console

from vitkit.models import create_model
from vitkit.progress import format_seconds, time_left
from vitkit.train.loop import _epoch_info, _format_row


def test_format_seconds():
    assert format_seconds(None) == "–" and format_seconds(float("nan")) == "–"
    assert format_seconds(0) == "0:00" and format_seconds(61.4) == "1:01"
    assert format_seconds(3725) == "1:02:05"


def test_time_left_at_the_average_rate():
    assert time_left(0, 100, 5.0) is None  # nothing done yet: no rate, no guess
    assert time_left(25, 100, 10.0) == 30.0
    assert time_left(100, 100, 10.0) == 0.0


def test_epoch_text_before_the_first_step_has_no_nan():
    text = _epoch_info(None, 1e-3, None, None)
    assert "nan" not in text and "loss –" in text
    assert "loss 0.1235" in _epoch_info(0.12345, 1e-3, 900.0, 12.0)


def test_epoch_line_shows_run_time_left():
    row = {"epoch": 1, "train_loss": 0.5, "img_per_s": 100.0}
    assert "run left 2:05" in _format_row(row, 10, 125.0)
    assert "run left" not in _format_row(row, 10, None)


def test_fit_shows_run_bar_with_time_left(monkeypatch, digits, quick):
    """On a terminal the bars show the run's elapsed time and time left, never ``nan``."""
    import vitkit.train.loop as loop

    buf = io.StringIO()
    monkeypatch.setattr(loop, "console", Console(file=buf, force_terminal=True, width=200))
    monkeypatch.setenv("VITKIT_PROGRESS", "1")
    loop.fit(create_model("vitkit_nano_p4_16", num_classes=10), digits, quick(epochs=2, threads=1))
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert re.search(r"run .*elapsed \d+:\d\d\s+run left (\d+:\d\d|–)", out)
    assert re.search(r"epoch 1/2 .*loss (\d\.\d{4}|–)\s+lr", out)
    assert "nan" not in out
    assert re.search(r"epoch +1/2 .*run left \d+:\d\d", out)  # the per-epoch line
