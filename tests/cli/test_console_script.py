"""The installed ``vitkit`` console script, run as a user runs it (issue 28): usage errors are typer's
short usage message with exit 2, ``--help`` exits 0 and imports no torch, Ctrl-C exits 130.

These run the real entry point in a subprocess: an in-process ``CliRunner`` did not catch that a new
typer (which vendors its own click) turned every usage error into a traceback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _script() -> str:
    here = Path(sys.executable).with_name("vitkit")
    found = str(here) if here.is_file() else shutil.which("vitkit")
    assert found, "the vitkit console script is not installed (README: pip install -e '.[test]')"
    return found


def _env() -> dict[str, str]:
    return {**os.environ, "VITKIT_PROGRESS": "0", "COLUMNS": "200"}


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_script(), *args], capture_output=True, text=True, env=_env(), timeout=timeout)


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["train", "--epoch", "3"], "No such option: --epoch"),
        (["trian"], "Did you mean 'train'"),
        (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
        (["evaluate"], "Missing argument"),
        (["quantize", "somewhere"], "Missing option '-o'"),
        (["evaluate", "r", "--probe"], "requires an argument"),
    ],
    ids=["unknown-option", "unknown-verb", "wrong-type", "missing-argument", "missing-option", "no-value"],
)
def test_usage_error_is_short_usage_message_exit_2(argv, fragment):
    proc = _run(*argv)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    assert fragment in text, text
    assert len(text.splitlines()) <= 8, text  # typer's short message (usage line + error box)


def test_bad_choice_is_one_error_line_exit_2(tmp_path):
    # choices are validated by vitkit's config (pydantic Literal), which names the field
    proc = _run("train", "--precision", "fp8", "-o", str(tmp_path / "r"))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text and "field 'precision'" in text, text
    assert not (tmp_path / "r").exists()


def test_help_exits_0_without_torch():
    proc = _run("--help")
    assert proc.returncode == 0 and "train" in proc.stdout, proc.stderr
    # every verb's help, in one process: none may import torch (help must answer in well under 2 s)
    code = (
        "import sys\n"
        "from vitkit.cli import app, main\n"
        "from vitkit.cli import _register\n"
        "_register()\n"
        "verbs = [c.name or c.callback.__name__.replace('_', '-') for c in app.registered_commands]\n"
        "bad = [v for v in verbs if main([v, '--help']) != 0]\n"
        "assert not bad, bad\n"
        "assert len(verbs) > 15, verbs\n"
        "print('torch' in sys.modules, len(verbs))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2] == "False", "a verb's --help imported torch"


def test_help_shows_defaults_and_every_train_option_has_help():
    proc = _run("train", "--help")
    assert proc.returncode == 0
    text = proc.stdout
    assert "[default: 30]" in text and "[default: adamw]" in text  # rich markup used to eat these
    flag_rows = [ln for ln in text.splitlines() if "--force" in ln or "--no-tensorboard" in ln]
    assert flag_rows and not any("<bool>" in ln for ln in flag_rows), flag_rows
    from vitkit.config import field_help
    from vitkit.config.train import TrainConfig

    for name in ("translate", "mixup", "seed", "threads", "hflip", "eval_every"):
        words = field_help(TrainConfig, name).split()[:2]
        assert " ".join(words) in " ".join(text.split()), name


def test_demo_help_matches_quick_epochs():
    from vitkit.demo import QUICK_EPOCHS

    proc = _run("demo", "--help")
    assert f"student {QUICK_EPOCHS} instead" in " ".join(proc.stdout.split())


def test_ctrl_c_during_training_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [_script(), "train", "--model", "vitkit_nano_p4_16", "--epochs", "500", "--no-tensorboard", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "config.yaml").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.5)  # inside the first epochs
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text
    assert "Traceback" not in text, text
    assert "--resume" in text


def test_ctrl_c_during_startup_is_one_line(monkeypatch, capsys):
    import vitkit.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_register", interrupted)
    assert cli.main(["train", "--help"]) == 130
    cap = capsys.readouterr()
    assert (cap.out + cap.err).strip() == "interrupted", cap
