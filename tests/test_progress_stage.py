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
        assert left is not None and left > 0.5  # 3 more at ≥ 0.2 s each (no upper bound: a loaded host)
        assert "calibrating 1/4" in st.info()
    assert vp.current_stage() is None


def test_parts_count_the_parts_still_to_come():
    with StageProgress("stage 1/1 bench", interval=60, echo=lambda m: None) as st:
        with st.part(0, 3):
            report("timing rounds", 0, 2)
            time.sleep(0.1)
            report("timing rounds", 1, 2)
            left = st.left()  # this part ≈ 0.2 s, 2 more parts of the same length
            assert left is not None and left > 0.25  # at least 2 × 0.1 s + this part's rest
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
    """Every pipeline stage runs inside a StageProgress, and training and bench tell it how far they
    are. Checked on what the stages report (a line every STAGE_LINE_SECONDS would depend on the
    host's speed: the bench of a nano model is over in 30 ms), and on the line built from it."""
    import yaml

    from vitkit.pipeline import run_pipeline

    monkeypatch.setenv("VITKIT_PROGRESS", "0")
    seen: list[tuple[str, tuple[int, int] | None, str, float, float]] = []
    original = StageProgress.report

    def spy(self, activity, done, total):
        seen.append((self.label, self.parts, activity, done, total))
        original(self, activity, done, total)

    monkeypatch.setattr(StageProgress, "report", spy)
    stages = [
        {"stage": "train", "name": "base", "model": "vitkit_nano_p4_16", "data": "digits", "epochs": 3,
         "quiet": True},
        {"stage": "bench", "threads": 1, "repeats": 12, "batch": 64, "latency_calls": 5, "memory": False,
         "onnx": False, "save": False},
    ]  # fmt: skip
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "stages": stages}))
    run_pipeline(p, echo=lambda m: None)
    train = [(d, t) for label, _, a, d, t in seen if label.startswith("stage 1/2 base (vitkit train)")]
    assert train and all(a == "training steps" for label, _, a, *_ in seen if "vitkit train" in label)
    assert {t for _, t in train} == {66} and max(d for d, _ in train) == 66
    bench = [(parts, a, d, t) for label, parts, a, d, t in seen if label == "stage 2/2 bench (vitkit bench)"]
    assert ((0, 1), "timing rounds", 12, 12) in bench, bench
    # the line such a report gives, as printed off a terminal
    with (
        StageProgress("stage 2/2 bench (vitkit bench)", interval=60, echo=lambda m: None) as st,
        st.part(0, 1),
    ):
        original(st, "timing rounds", 0, 12)
        time.sleep(0.05)
        original(st, "timing rounds", 3, 12)
        assert re.fullmatch(r"part 1/1  timing rounds 3/12  elapsed 0:00  left \d:\d\d", st.info())
