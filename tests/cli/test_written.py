"""Issue 25 item 8: "written:" lines name the files the command really wrote, by their real paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitkit.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from vitkit.api import train_model
    from vitkit.train import TrainConfig

    out = tmp_path_factory.mktemp("written") / "tiny"
    cfg = TrainConfig(model="vitkit_nano_p4_16", data="digits", epochs=1, train_size=128, val_size=64,
                      tensorboard=False)  # fmt: skip
    train_model(cfg, out, quiet=True)
    return out


def _run(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert code == 0, text
    return text.replace("\n", "")  # rich folds long paths at 80 columns when not on a terminal


def test_evaluate_lists_only_what_it_wrote(capsys, tiny_run, tmp_path):
    out = tmp_path / "ev"
    text = _run(capsys, "evaluate", tiny_run, "-o", out)
    assert f"written: {out}/ (metrics.json, confusion_matrix.png)" in text
    assert "model.safetensors" not in text  # evaluate writes no model


def test_train_lists_the_files_in_the_new_run(capsys, tmp_path):
    out = tmp_path / "r"
    text = _run(capsys, "train", "--model", "vitkit_nano_p4_16", "--epochs", "1", "--train-size", "128",
                "--val-size", "64", "--no-tensorboard", "--quiet", "-o", out)  # fmt: skip
    listed = text.split(f"written: {out}/ (")[1].split(")")[0].split(", ")
    assert listed == sorted(p.name for p in out.iterdir() if p.is_file())
    assert {"model.json", "model.safetensors", "config.yaml"} <= set(listed)


def test_bench_names_each_run_not_a_placeholder(capsys, tiny_run):
    text = _run(capsys, "bench", tiny_run, "--repeats", "1", "--batch", "8", "--latency-calls", "1",
                "--threads", "1", "--no-onnx", "--no-memory", "--no-baseline")  # fmt: skip
    assert "RUN/" not in text
    assert f"written: {tiny_run / 'bench.json'}, {tiny_run / 'bench.png'}" in text
    assert (tiny_run / "bench.json").is_file()
