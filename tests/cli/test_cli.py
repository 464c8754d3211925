"""The CLI: real commands, config + flags, and every bad input as one line with exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vitkit.cli import main
from vitkit.io import read_json

QUICK = ["--model", "vitkit_nano_p4_16", "--epochs", "2", "--no-tensorboard", "--quiet"]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def image_folder(tmp_path, digits):
    root = tmp_path / "imgs"
    for c in range(3):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for j, i in enumerate((digits.train.targets == c).nonzero().flatten()[:20]):
            Image.fromarray(digits.train.images[i, 0].numpy()).save(d / f"{j}.png")
    return root


def test_train_on_folder_then_evaluate(tmp_path, capsys, image_folder):
    out = tmp_path / "run"
    code, text = run_cli(capsys, "train", *QUICK, "--data", f"folder:{image_folder}", "--img-size", "16",
                         "--optimizer", "lion", "-o", out)  # fmt: skip
    assert code == 0, text
    assert (out / "model.safetensors").is_file() and "top1" in text
    code, text = run_cli(capsys, "evaluate", out, "--data", f"folder:{image_folder}")
    assert code == 0, text
    (eval_dir,) = out.glob("eval-folder_*")
    m = read_json(eval_dir / "metrics.json")
    # the training data itself: evaluated on the run's own held-out 20%, never on images it trained on
    assert m["n"] == 12 and len(m["per_class_accuracy"]) == 3


def test_config_file_and_flags_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: vitkit_nano_p4_16\nepochs: 1\nlr: 0.002\ntensorboard: false\ntrain_size: 200\n")
    out = tmp_path / "r"
    code, text = run_cli(capsys, "train", "--config", cfg, "--epochs", "2", "--quiet", "-o", out)
    assert code == 0, text
    saved = read_json(out / "metrics.json")
    assert saved["epochs"] == 2
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lr"] == 0.002 and resolved["epochs"] == 2 and resolved["train_size"] == 200


def test_resume_continues_with_more_epochs(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(capsys, "train", *QUICK, "--train-size", "200", "-o", out)[0] == 0
    code, text = run_cli(capsys, "train", "--resume", out, "--epochs", "3", "--quiet")
    assert code == 0, text
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--model", "vit_nope", "-o", "{tmp}/a"], "unknown model 'vit_nope'"),
        (
            ["train", "--data", "folder:{tmp}/missing", "-o", "{tmp}/a"],
            "image folder '.*missing' does not exist",
        ),
        (["train", "--data", "folder:{tmp}/emptydir", "-o", "{tmp}/a"], "no class sub-folders"),
        (["train", "--data", "csv:{tmp}/bad.csv", "-o", "{tmp}/a"], "no image path column"),
        (
            ["train", "--data", "csv:{tmp}/missing.csv", "-o", "{tmp}/a"],
            "line 2: image .*gone.png' not found",
        ),
        (["train", "--data", "npz:{tmp}/noy.npz", "-o", "{tmp}/a"], "missing array 'y'"),
        (["train", "--config", "{tmp}/unknown.yaml", "-o", "{tmp}/a"], "unknown field 'learning_rate'"),
        (["train", "--config", "{tmp}/typo.yaml", "-o", "{tmp}/a"], "field 'epochs'.*valid integer"),
        (["train", "--epochs", "0", "-o", "{tmp}/a"], "field 'epochs'"),
        (["train", "--data", "cifar10", "-o", "{tmp}/a"], "unknown dataset 'cifar10'"),
        (["train", *QUICK], "say where to write the run"),
        (["evaluate", "{tmp}/no_run"], "run directory '.*no_run' does not exist"),
        (["train", "--resume", "{tmp}/emptydir"], "no config.yaml"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "bad.csv").write_text("file_name,label\na.png,x\n")
    (tmp_path / "missing.csv").write_text("path,label\ngone.png,x\n")
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 8, 8), np.uint8))
    (tmp_path / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (tmp_path / "typo.yaml").write_text("epochs: ten\n")
    code, text = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2
    import re

    assert re.search(message, one_error_line(text)), text
    assert not (tmp_path / "a" / "model.json").exists()


def test_nan_loss_via_cli_exit_2_and_no_model(tmp_path, capsys):
    out = tmp_path / "nan"
    code, text = run_cli(
        capsys, "train", *QUICK, "--optimizer", "sgd", "--lr", "1e30", "--train-size", "300", "-o", out
    )
    assert code == 2
    assert "loss became" in one_error_line(text)
    assert not (out / "model.json").exists()


def test_output_exists_and_resume_class_mismatch(tmp_path, capsys, image_folder):
    out = tmp_path / "r"
    assert run_cli(capsys, "train", *QUICK, "--train-size", "200", "-o", out)[0] == 0
    code, text = run_cli(capsys, "train", *QUICK, "-o", out)
    assert code == 2 and "already exists" in one_error_line(text)
    # Resume against data with another class count: the config's data is changed by a flag.
    code, text = run_cli(capsys, "train", "--resume", out, "--data", f"folder:{image_folder}", "--img-size", "16",
                         "--epochs", "3")  # fmt: skip
    assert code == 2 and "trained on 10 classes" in one_error_line(text)
    # Evaluate on data whose class count differs from the run's.
    code, text = run_cli(capsys, "evaluate", out, "--data", f"folder:{image_folder}")
    assert code == 2 and "num_classes mismatch" in one_error_line(text)


def test_truncated_weights_evaluate_exit_2(tmp_path, capsys, trained_run):
    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    code, text = run_cli(capsys, "evaluate", bad)
    assert code == 2 and "truncated" in one_error_line(text)


def test_console_script_prints_no_traceback(tmp_path):
    env = {**os.environ, "VITKIT_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "vitkit", "train", "--model", "nope", "-o", str(tmp_path / "x")],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model 'nope'" in proc.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "vitkit", "--help"], capture_output=True, text=True, timeout=120
    )
    for verb in ("train", "evaluate", "demo", "bench"):
        assert verb in help_.stdout


def test_bench_cli_writes_json(tmp_path, capsys, trained_run):
    out = tmp_path / "bench.json"
    code, text = run_cli(capsys, "bench", trained_run, "--repeats", "2", "--batch", "16", "-o", out)
    assert code == 0, text
    report = read_json(out)
    run = report["runs"][str(trained_run)]
    assert run["throughput_ratio_vs_timm"] > 0
    res = list(run["results"].values())
    assert res[0]["flops"] == res[1]["flops"] > 0 and res[0]["parameters"] == res[1]["parameters"]
