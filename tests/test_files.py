"""Issue 25, items 6 and 7: the modes of what vitkit writes, and what a failed or killed command leaves."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitkit.errors import NonFiniteLossError, VitkitError
from vitkit.io import current_umask, owned_output_dir, write_text


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _modes(root: Path) -> tuple[set[int], set[int]]:
    files = {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")] if p.is_dir()}
    return files, dirs


def _tiny(quick, **kw):
    return quick(epochs=1, train_size=128, val_size=64, **kw)


def test_current_umask_reads_without_changing(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027  # still set: reading did not reset it


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_files_and_analysis_dirs_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    from vitkit.analyze.common import output_dir

    umask(mask)
    write_text(tmp_path / "a.txt", "x")
    with output_dir(tmp_path / "analysis") as d:
        write_text(d / "b.json", "{}")
        save_file({"x": torch.zeros(2)}, str(d / "c.safetensors"))  # creates its file 0600 itself
    files, dirs = _modes(tmp_path / "analysis")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == file_mode
    assert files == {file_mode} and dirs == {dir_mode}


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_a_training_run_follows_the_umask(tmp_path, umask, quick, mask, file_mode, dir_mode):
    from vitkit.api import train_model

    umask(mask)
    out = tmp_path / "runs" / "r"
    train_model(_tiny(quick), out, quiet=True)
    files, dirs = _modes(out)
    assert {"checkpoint.pt", "model.safetensors", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert files == {file_mode}, sorted(oct(m) for m in files)
    assert dirs == {dir_mode}, sorted(oct(m) for m in dirs)


def test_resume_removes_a_killed_checkpoint_write_and_nothing_else(tmp_path, quick):
    from vitkit.api import train_model
    from vitkit.train import TrainingInterrupted

    out = tmp_path / "r"
    cfg = quick(epochs=2, train_size=128, val_size=64)
    with pytest.raises(TrainingInterrupted):
        train_model(cfg, out, quiet=True, stop_after_epoch=1)
    stale = out / ".checkpoint.pt.k9x_3abc.tmp"  # what kill -9 during torch.save leaves
    stale.write_bytes(b"")
    foreign = [out / ".notes.txt.k9x_3abc.tmp", out / "mine.tmp"]  # not ours: kept
    for f in foreign:
        f.write_text("user")
    train_model(cfg, out, resume=True, quiet=True)
    assert not stale.exists()
    assert all(f.read_text() == "user" for f in foreign)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(tmp_path, quick):
    from vitkit.api import train_model
    from vitkit.train.objectives import ClassificationObjective, ObjectiveOutput

    class NaN(ClassificationObjective):
        def __call__(self, model, x, y):
            out = super().__call__(model, x, y)
            return ObjectiveOutput(out.loss * float("nan"), out.logits)

    out = tmp_path / "new" / "r"
    with pytest.raises(NonFiniteLossError):
        train_model(_tiny(quick), out, objective=NaN(), quiet=True)
    assert not (tmp_path / "new").exists()  # the parent it created too
    # so the rerun needs no --force
    train_model(_tiny(quick), out, quiet=True)
    assert (out / "model.json").is_file()


def test_a_failed_run_in_an_existing_directory_removes_only_its_own_files(tmp_path, quick):
    from vitkit.api import train_model

    out = tmp_path / "r"
    out.mkdir()
    with pytest.raises(VitkitError):
        train_model(_tiny(quick, data="npz:/nonexistent/x.npz"), out, quiet=True)
    assert out.is_dir() and list(out.iterdir()) == []


def test_owned_output_dir_never_touches_what_was_there(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "old.txt").write_text("keep")

    def refuse():
        raise VitkitError("not empty")

    with pytest.raises(VitkitError), owned_output_dir(d, prepare=refuse):
        pass
    with pytest.raises(RuntimeError), owned_output_dir(d) as p:
        (p / "new.txt").write_text("x")
        (p / "sub").mkdir()
        raise RuntimeError
    assert sorted(x.name for x in d.iterdir()) == ["old.txt"]
    # success keeps everything
    with owned_output_dir(tmp_path / "e" / "f") as p:
        p.mkdir(parents=True)
    assert (tmp_path / "e" / "f").is_dir()


def test_kept_when_a_checkpoint_exists(tmp_path):
    from vitkit.runs import new_run_dir

    with pytest.raises(KeyboardInterrupt), new_run_dir(tmp_path / "r") as p:
        torch.save({}, p / "checkpoint.pt")
        raise KeyboardInterrupt
    assert (tmp_path / "r" / "checkpoint.pt").is_file()


def test_failed_writes_leave_no_new_parent_folders(tmp_path):
    from vitkit.analyze.common import output_dir
    from vitkit.io import write_atomic

    def boom(p):
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "a" / "b" / "f.json", boom)
    with pytest.raises(RuntimeError), output_dir(tmp_path / "c" / "d" / "analysis"):
        raise RuntimeError("analysis failed")
    assert list(tmp_path.iterdir()) == []
    # a folder that was there stays
    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "keep" / "f.json", boom)
    assert (tmp_path / "keep").is_dir()


def test_api_checks_the_output_before_the_work(tmp_path):
    from vitkit.stages.quantize import quantize_run
    from vitkit.stages.report import write_report

    (tmp_path / "adir").mkdir()
    (tmp_path / "f").write_text("x")
    # the run does not exist: only an output check that comes first can produce these messages
    with pytest.raises(VitkitError, match="is an existing directory; expected a file"):
        write_report([tmp_path / "no-run"], tmp_path / "adir")
    with pytest.raises(VitkitError, match="is an existing file; expected a directory"):
        quantize_run(tmp_path / "no-run", tmp_path / "f")
