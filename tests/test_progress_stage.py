"""Stage progress (pipelines, the demo): time left inside a stage, on a terminal and off one."""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

import vitkit.progress as vp
from vitkit.progress import StageProgress, report, track


def test_no_stage_no_effect():
    report("anything", 1, 2)  # outside a stage: nothing to tell, nothing happens
    assert vp.current_stage() is None
    assert list(track(range(5), description="x")) == [0, 1, 2, 3, 4]


def test_time_left_of_the_current_activity():
    with StageProgress("stage 1/1 s", interval=60, echo=lambda m: None) as st:
        assert st.left() is None and "left –" in st.info()  # nothing reported yet
        report("calibrating", 0, 4)
        time.sleep(0.2)
        report("calibrating", 1, 4)
        left = st.left()
        assert left is not None and 0.4 < left < 2.0  # 3 more at ≥ 0.2 s each
        assert "calibrating 1/4" in st.info()
    assert vp.current_stage() is None


def test_parts_count_the_parts_still_to_come():
    with StageProgress("stage 1/1 bench", interval=60, echo=lambda m: None) as st:
        with st.part(0, 3):
            report("timing rounds", 0, 2)
            time.sleep(0.1)
            report("timing rounds", 1, 2)
            left = st.left()  # this part ≈ 0.2 s, 2 more parts of the same length
            assert left is not None and 0.4 < left < 1.5
        assert st.part_seconds and st.parts is None


def test_lines_off_a_terminal(monkeypatch):
    """Off a terminal a silent stage still prints a line with elapsed time and time left."""
    monkeypatch.setenv("VITKIT_PROGRESS", "0")
    lines: list[str] = []
    with StageProgress("stage 3/5 w8a8 (vitkit quantize)", interval=0.05, echo=lines.append):
        for _ in track(range(4), description="calibrating", min_items=1):
            time.sleep(0.06)
    assert lines, "no progress line from a stage that ran for 0.24 s with a 0.05 s interval"
    assert all(m.startswith("stage 3/5 w8a8 (vitkit quantize): ") for m in lines)
    assert any(re.search(r"calibrating \d/4  elapsed 0:00  left 0:00", m) for m in lines)


@pytest.mark.parametrize("what", ["track", "fit"])
def test_bars_inside_a_stage_share_its_display(monkeypatch, digits, quick, what):
    """On a terminal, bars of the work inside a stage join the stage's display (rich allows one
    live display: a second one would raise LiveError) and show the stage's time left."""
    import vitkit.train.loop as loop

    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=200)
    monkeypatch.setattr(vp, "console", con)
    monkeypatch.setattr(loop, "console", con)
    monkeypatch.setenv("VITKIT_PROGRESS", "1")
    with StageProgress("stage 2/4 vit"):
        if what == "track":
            for _ in track(range(300), description="attacking"):
                time.sleep(0.004)
        else:
            from vitkit.models import create_model

            loop.fit(create_model("vitkit_nano_p4_16", num_classes=10), digits, quick(epochs=1, threads=1))
        time.sleep(0.6)  # one more refresh of the stage bar
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    activity = "attacking" if what == "track" else "training steps"
    assert re.search(rf"stage 2/4 vit .*{activity} \d+/\d+  elapsed \d:\d\d  left \d:\d\d", out)


def test_pipeline_stages_report_time_left(tmp_path, monkeypatch):
    """Every pipeline stage runs inside a StageProgress: training and bench say how far they are."""
    import yaml

    from vitkit.pipeline import run_pipeline

    monkeypatch.setenv("VITKIT_PROGRESS", "0")
    monkeypatch.setattr(vp, "STAGE_LINE_SECONDS", 0.2)
    stages = [
        {"stage": "train", "name": "base", "model": "vitkit_nano_p4_16", "data": "digits", "epochs": 3,
         "quiet": True},
        {"stage": "bench", "threads": 1, "repeats": 12, "batch": 64, "latency_calls": 5, "memory": False,
         "onnx": False, "save": False},
    ]  # fmt: skip
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "stages": stages}))
    log: list[str] = []
    run_pipeline(p, echo=log.append)
    assert any(re.match(r"stage 1/2 base \(vitkit train\): training steps \d+/66  elapsed", m) for m in log)
    assert any(
        re.match(
            r"stage 2/2 bench \(vitkit bench\): part 1/1  timing rounds \d+/12  elapsed .* left \d:\d\d", m
        )
        for m in log
    ), log
