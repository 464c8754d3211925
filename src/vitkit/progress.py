"""Progress bars and console output (rich), quiet when output is not a terminal or when asked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console

T = TypeVar("T")

console = Console(stderr=True)


def progress_enabled() -> bool:
    """Bars show on a terminal unless VITKIT_PROGRESS=0; VITKIT_PROGRESS=1 forces them."""
    flag = os.environ.get("VITKIT_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no")
    return sys.stderr.isatty()


def track(
    items: Iterable[T], total: int | None = None, description: str = "", min_items: int = 200
) -> Iterator[T]:
    """rich's ``track`` for long loops; plain iteration for short ones or without a terminal."""
    if not progress_enabled() or (total is not None and total < min_items):
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, total=total, description=description, console=console, transient=True)


def format_seconds(seconds: float | None) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on); ``–`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "–"
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def time_left(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the average rate so far; None before anything is done (no rate yet)."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)
