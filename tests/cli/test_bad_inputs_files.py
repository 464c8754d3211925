"""Issue 25 items 3 and 7 as bad-input tables: every verb's -o/--output is checked before any work
(a missing RUN argument would fail otherwise, so each row also proves the check comes first), and a
command that fails leaves no directory it created behind."""

from __future__ import annotations

from pathlib import Path

import pytest

# verb argv with OUT for the output path and RUN for a run directory that does not exist: the -o
# check must fire before anything reads RUN.
DIR_VERBS = {
    "train": ["train", "-o", "OUT"],
    "evaluate": ["evaluate", "RUN", "-o", "OUT"],
    "pretrain": ["pretrain", "-o", "OUT"],
    "finetune": ["finetune", "RUN", "-o", "OUT"],
    "distill": ["distill", "--teacher", "RUN", "-o", "OUT"],
    "evaluate-heads": ["evaluate-heads", "RUN", "-o", "OUT"],
    "quantize": ["quantize", "RUN", "-o", "OUT"],
    "reduce-tokens": ["reduce-tokens", "RUN", "-o", "OUT"],
    "prune": ["prune", "RUN", "-o", "OUT"],
    "reparam": ["reparam", "RUN", "-o", "OUT"],
    "compare": ["compare", "RUN", "-o", "OUT"],
    "attack": ["attack", "RUN", "-o", "OUT"],
    "perturb": ["perturb", "RUN", "-o", "OUT"],
    "similarity": ["similarity", "RUN", "RUN", "-o", "OUT"],
    "attention": ["attention", "RUN", "-o", "OUT"],
    "artifacts": ["artifacts", "RUN", "-o", "OUT"],
    "mil": ["mil", "--features", "RUN", "--bags", "csv:RUN/bags.csv", "-o", "OUT"],
    "rank-configs": ["rank-configs", "-o", "OUT"],
    "demo": ["demo", "-o", "OUT"],
}
# verbs whose -o is a new run directory: a non-empty one needs --force
FORCE_VERBS = ["train", "pretrain", "finetune", "distill", "quantize", "reduce-tokens", "prune", "reparam", "rank-configs"]  # fmt: skip
FILE_VERBS = {
    "report": ["report", "RUN", "-o", "OUT"],
    "bench": ["bench", "RUN", "-o", "OUT"],
}
UNWRITABLE = "/sys/vitkit-no-such-dir/out"  # EACCES even for root (os.access would say yes to root)


def _argv(template: list[str], out: Path | str, run: Path) -> list[str]:
    return [str(out) if a == "OUT" else a.replace("RUN", str(run)) for a in template]


def _setup(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "adir").mkdir()
    return {
        "existing_file": tmp_path / "file.txt",
        "under_file": tmp_path / "file.txt" / "out",
        "non_empty": tmp_path / "full",
        "existing_dir": tmp_path / "adir",
        "unwritable": Path(UNWRITABLE),
    }


DIR_ROWS = [
    *[(v, "existing_file", r"-o/--output '.*file\.txt' is an existing file; expected a directory") for v in DIR_VERBS],
    *[(v, "under_file", r"-o/--output '.*out': '.*file\.txt' is a file, not a directory") for v in DIR_VERBS],
    *[(v, "unwritable", r"-o/--output '/sys/.*': cannot write in '/sys'") for v in DIR_VERBS],
    *[(v, "non_empty", r"-o/--output '.*full' already exists and is not empty; .*--force") for v in FORCE_VERBS],
]  # fmt: skip
FILE_ROWS = [
    *[(v, "existing_dir", r"-o/--output '.*adir' is an existing directory; expected a file") for v in FILE_VERBS],
    *[(v, "under_file", r"-o/--output '.*out': '.*file\.txt' is a file, not a directory") for v in FILE_VERBS],
    *[(v, "unwritable", r"-o/--output '/sys/.*': cannot write in '/sys'") for v in FILE_VERBS],
]  # fmt: skip


@pytest.mark.parametrize("verb, case, message", DIR_ROWS)
def test_directory_outputs_are_checked_first(bad_input, tmp_path, verb, case, message):
    out = _setup(tmp_path)[case]
    bad_input(_argv(DIR_VERBS[verb], out, tmp_path / "no-run"), message, workdir=tmp_path)


@pytest.mark.parametrize("verb, case, message", FILE_ROWS)
def test_file_outputs_are_checked_first(bad_input, tmp_path, verb, case, message):
    out = _setup(tmp_path)[case]
    bad_input(_argv(FILE_VERBS[verb], out, tmp_path / "no-run"), message, workdir=tmp_path)


def test_an_empty_existing_directory_is_a_valid_output(bad_input, tmp_path):
    # the check passes, so the error is the missing run's, not the output's
    (tmp_path / "adir").mkdir()
    bad_input(["quantize", tmp_path / "no-run", "-o", tmp_path / "adir"], r"no-run", workdir=tmp_path)


# Item 7: a failed command leaves no directory it created (the -o dir and its missing parents).
FAILED_ROWS = [
    (["train", "-o", "OUT", "--data", "npz:RUN/missing.npz", "--epochs", "1"], r"missing\.npz"),
    (["pretrain", "-o", "OUT", "--data", "npz:RUN/missing.npz", "--epochs", "1"], r"missing\.npz"),
    (
        [
            "rank-configs",
            "-o",
            "OUT",
            "--depths",
            "1",
            "--widths",
            "32",
            "--heads",
            "2",
            "--patches",
            "4",
            "--train-epochs",
            "1",
            "--data",
            "npz:RUN/missing.npz",
        ],
        r"missing\.npz",
    ),
]


@pytest.mark.parametrize("argv, message", FAILED_ROWS)
def test_a_failed_command_leaves_no_output_directory(bad_input, tmp_path, argv, message):
    out = tmp_path / "new" / "run"
    bad_input(_argv(argv, out, tmp_path / "no-run"), message, workdir=tmp_path)
    assert not (tmp_path / "new").exists()
