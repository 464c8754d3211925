"""Atomic file writes: a reader sees the old file or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from vitkit.errors import VitkitError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status).

    ``os.umask`` can only be read by setting it; the fallback sets 0 and restores it at once under a
    lock, so our own threads never create a file under the temporary umask of 0.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary ``open()`` would give a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new directory: 0777 less the umask."""
    return 0o777 & ~current_umask()


def make_temp_dir(prefix: str, dir: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """``tempfile.mkdtemp`` with the mode a plain ``mkdir`` would give (mkdtemp always makes 0700,
    which would make every output folder private whatever the user's umask says)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=dir))
    os.chmod(tmp, dir_mode())
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    created = first_missing(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    mode = file_mode()
    ok = False
    try:
        yield tmp_path
        # mkstemp creates 0600 (and some writers, e.g. safetensors, recreate the file 0600); the
        # rename keeps that mode. Give it what the umask allows, as an ordinary open() would, so a
        # shared runs/ or a served report stays readable by others.
        os.chmod(tmp_path, mode)
        # fsync so a crash right after the rename cannot leave an empty file behind the new name.
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        ok = True
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        if not ok and created is not None:
            remove_empty_dirs(path.parent, created)  # a failed write leaves no new empty folders


def remove_empty_dirs(start: Path, top: Path) -> None:
    """Remove ``start`` and its parents up to and including ``top`` while they are empty (the folders
    a failed command created; a folder someone else has written into meanwhile is kept)."""
    p, top = start.absolute(), top.absolute()
    while True:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top or p.parent == p:
            return
        p = p.parent


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda p: p.write_text(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda p: p.write_bytes(data))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    # numpy scalars and arrays, tensors and paths show up in metrics; make them plain JSON.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# -- output paths ------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(
    path: str | os.PathLike,
    kind: Literal["file", "dir"],
    *,
    force: bool | None = None,
    option: str = "-o/--output",
) -> Path:
    """Refuse an output path that cannot be written, before any slow work (loading, calibration, rendering).

    ``kind="file"``: the target must not be an existing directory. ``kind="dir"``: it must not be an
    existing file, and when ``force`` is given (False/True) a non-empty directory needs ``--force``
    (``None``: the verb replaces whole directories, so a non-empty one is fine). The directory the
    output will be created in (the nearest existing ancestor) must be a directory we can write to,
    which is tried for real: ``os.access`` says yes to root even on a read-only file system.
    """
    p = Path(path)
    if kind == "file" and p.is_dir():
        raise VitkitError(f"{option} '{p}' is an existing directory; expected a file path to write")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise VitkitError(f"{option} '{p}' is an existing file; expected a directory")
    if kind == "dir" and force is False and p.is_dir() and any(p.iterdir()):
        raise VitkitError(
            f"{option} '{p}' already exists and is not empty; choose another {option.split('/')[0]} or pass --force"
        )
    base = p if (kind == "dir" and p.is_dir()) else _nearest_existing(p.parent)
    if not base.is_dir():
        raise VitkitError(f"{option} '{p}': '{base}' is a file, not a directory, so '{p}' cannot be created")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vitkit-write-check.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise VitkitError(f"{option} '{p}': cannot write in '{base}' ({e.strerror or e})") from None
    return p


def first_missing(path: Path) -> Path | None:
    """The topmost directory of ``path`` that does not exist yet (what mkdir(parents=True) would create)."""
    p = path.absolute()
    if p.exists():
        return None
    while not p.parent.exists() and p.parent != p:
        p = p.parent
    return p


@contextlib.contextmanager
def owned_output_dir(
    path: str | os.PathLike,
    *,
    prepare: Callable[[], Any] | None = None,
    keep_if: Callable[[Path], bool] = lambda p: False,
) -> Iterator[Path]:
    """Around a command that writes into the directory ``path``: if it fails, undo what it did there.

    The directories it created (``path`` and any missing parents) are removed; in a directory that was
    already there only the entries the command added are removed (``prepare``, e.g. the --force
    clearing, runs first, so what it removed stays removed and what was there stays there).
    ``keep_if(path)`` true keeps everything (e.g. a run with a checkpoint, which ``--resume`` continues).
    Interrupts (KeyboardInterrupt) count as failures too.
    """
    p = Path(path)
    created = first_missing(p)
    before: set[str] | None = None  # None until ``prepare`` succeeded: then nothing of ours is inside yet
    try:
        if prepare is not None:
            prepare()
        before = set(os.listdir(p)) if (created is None and p.is_dir()) else set()
        yield p
    except BaseException:
        if created is not None and (before is None or not keep_if(p)):
            shutil.rmtree(created, ignore_errors=True)
        elif before is not None and p.is_dir() and not keep_if(p):
            for name in set(os.listdir(p)) - before:
                child = p / name
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
