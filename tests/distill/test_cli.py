"""`vitkit train` of a CNN teacher on long-tailed digits, `vitkit distill` end to end, and the bad
inputs the issue lists: one line each, exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vitkit.cli import main


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "teacher"
    code = main(
        [
            "train",
            "--data",
            "digits",
            "--longtail",
            "10",
            "--model",
            "test_resnet",
            "--img-size",
            "16",
            "--epochs",
            "4",
            "--lr",
            "3e-3",
            "--sampler",
            "balanced",
            "-q",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_cnn_teacher_trains_at_its_size_and_distills(cnn_teacher, tmp_path, capsys):
    m = json.loads((cnn_teacher / "metrics.json").read_text())
    assert m["top1"] > 0.5  # a CNN at 16 px learns digits in 4 epochs
    manifest = json.loads((cnn_teacher / "model.json").read_text())
    assert manifest["base"]["kwargs"]["img_size"] == 16
    out = tmp_path / "student"
    code = main(
        [
            "distill",
            "--student",
            "vitkit_nano_p4_16",
            "--add-dist-token",
            "--teacher",
            str(cnn_teacher),
            "--method",
            "deit-lt",
            "--data",
            "digits",
            "--longtail",
            "10",
            "--epochs",
            "2",
            "--train-size",
            "400",
            "--val-size",
            "100",
            "-q",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    for h in ("cls", "dist", "mean"):
        assert {"top1", "balanced_accuracy", "many_shot_accuracy", "few_shot_accuracy"} <= set(m["heads"][h])
    assert m["distillation"]["name"] == "deit-lt" and m["teacher"]["top1"] > 0.5
    assert (out / "distill.yaml").is_file() and (out / "config.yaml").is_file()
    import vitkit

    model = vitkit.load(out)
    assert model.num_prefix_tokens == 2
    code = main(["evaluate-heads", str(out), "-o", str(tmp_path / "heads")])
    assert code == 0
    again = json.loads((tmp_path / "heads" / "metrics.json").read_text())
    assert again["mean_top1"] == pytest.approx(m["mean_top1"], abs=1e-6)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and "Traceback" not in err
    return " ".join(lines)


def test_missing_teacher_run(tmp_path, capsys):
    code = main(
        ["distill", "--teacher", str(tmp_path / "nope"), "--data", "digits", "-o", str(tmp_path / "s")]
    )
    line = _error_line(capsys)
    assert code == 2 and f"teacher run directory '{tmp_path / 'nope'}' does not exist" in line
    assert not (tmp_path / "s").exists()


def test_bad_inputs_exit_2(cnn_teacher, tmp_path, capsys):
    # a student without a DIST token asked for DeiT distillation: say how to add one
    code = main(
        [
            "distill",
            "--student",
            "vitkit_nano_p4_16",
            "--teacher",
            str(cnn_teacher),
            "--data",
            "digits",
            "-o",
            str(tmp_path / "a"),
        ]
    )
    assert code == 2 and "--add-dist-token" in _error_line(capsys)
    # teacher and student with different class counts
    rng = np.random.default_rng(0)
    npz = tmp_path / "three.npz"
    np.savez(npz, x=rng.integers(0, 255, (60, 8, 8), dtype=np.uint8), y=np.arange(60) % 3)
    code = main(["distill", "--teacher", str(cnn_teacher), "--data", f"npz:{npz}", "-o", str(tmp_path / "b")])
    assert code == 2 and "predicts 10 classes but the student/data has 3" in _error_line(capsys)
    # a timm name without local weights, an unknown method, an option of another method
    code = main(["distill", "--teacher", "resnet18", "--data", "digits", "-o", str(tmp_path / "c")])
    assert code == 2 and "--teacher-weights" in _error_line(capsys)
    code = main(["distill", "--teacher", str(cnn_teacher), "--method", "fitnet", "-o", str(tmp_path / "d")])
    assert code == 2 and "unknown --method" in _error_line(capsys)
    code = main(["distill", "--teacher", str(cnn_teacher), "--drw", "0.5", "-o", str(tmp_path / "e")])
    assert code == 2 and "--drw does not apply to --method deit" in _error_line(capsys)
    for d in "abcde":
        assert not (tmp_path / d).exists()
