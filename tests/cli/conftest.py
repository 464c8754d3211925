"""The bad-input harness: every table of bad inputs (tests/cli/test_bad_inputs_*.py) checks the same promise.

A user error ends with exit code 2 and exactly one line starting ``error:`` that names what is wrong;
never a traceback; and nothing is left behind (no output file or directory that was not there before).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def bad_input(capsys) -> Callable[..., str]:
    """Run ``vitkit ARGV`` in-process; assert exit ``code``, one error line matching ``message``.

    ``workdir``: files created there by the command (other than ``allowed``) fail the check
    ("nothing left behind"). Returns the whole output for further checks.
    """
    from vitkit.cli import main

    def check(
        argv: Sequence[str | Path],
        message: str,
        *,
        code: int = 2,
        workdir: Path | None = None,
        allowed: Sequence[str] = (),
    ) -> str:
        before = _snapshot(workdir) if workdir is not None else set()
        rc = main([str(a) for a in argv])
        cap = capsys.readouterr()
        text = cap.out + cap.err
        assert rc == code, f"exit {rc}, expected {code}:\n{text}"
        assert "Traceback" not in text, text
        if code == 2:
            lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
            assert len(lines) == 1, text
            assert re.search(message, lines[0]), f"{message!r} not in {lines[0]!r}"
        else:
            assert re.search(message, text), f"{message!r} not in {text!r}"
        if workdir is not None:
            new = _snapshot(workdir) - before - set(allowed)
            assert not new, f"left behind: {sorted(new)}"
        return text

    return check
