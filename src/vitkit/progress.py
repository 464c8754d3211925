"""Progress bars and console output (rich), quiet when output is not a terminal or when asked.

A long job made of stages (``vitkit pipeline``, ``vitkit demo``) runs each stage inside a
:class:`StageProgress`: one bar for the stage (``stage i/N name``, elapsed, time left) on a
terminal, or a line every ``interval`` seconds elsewhere (logs, pipes), so that no stage runs
silently. Work inside a stage says how far it is with :func:`report` (``track`` does so for every
loop it wraps); the bars of the work itself (training, ``track``) join the stage's display instead
of opening their own (rich allows one live display at a time).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console

T = TypeVar("T")

# Off a terminal (a pipe, a log file, CI) rich assumes 80 columns and cuts tables (``vitkit bench``:
# 10 columns) and wraps long lines; there the width is wide unless COLUMNS says otherwise.
WIDTH_OFF_TERMINAL = 250


def make_console() -> Console:
    """The console on stderr: the terminal's width on a terminal, else ``WIDTH_OFF_TERMINAL``."""
    c = Console(stderr=True)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        c = Console(stderr=True, width=WIDTH_OFF_TERMINAL)
    return c


console = make_console()
STAGE_LINE_SECONDS = 30.0  # off a terminal: a stage's progress line this often (none for quick stages)


def progress_enabled() -> bool:
    """Bars show on a terminal unless VITKIT_PROGRESS=0; VITKIT_PROGRESS=1 forces them."""
    flag = os.environ.get("VITKIT_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no")
    return sys.stderr.isatty()


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


def progress_columns() -> list[Any]:
    """The columns every vitkit bar shares (so that bars of nested work fit in one display)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    return [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
    ]


class StageProgress:
    """Elapsed time and time left of one stage of a longer job, shown while the stage runs.

    The time left is that of the stage's current activity (the last :func:`report`: training steps,
    calibrated blocks, attacked batches, benchmark rounds) at its average rate so far; within
    :meth:`part` ``i`` of ``n`` (e.g. one benchmarked run of several) it also counts the parts still
    to come, each as long as the parts so far. ``left –`` until the stage reports anything.
    """

    def __init__(
        self, label: str, *, interval: float | None = None, echo: Callable[[str], None] | None = None
    ) -> None:
        self.label = label
        self.interval = STAGE_LINE_SECONDS if interval is None else interval
        self.t0 = time.perf_counter()
        self.echo = echo or (lambda m: console.print(m, highlight=False))
        self.activity: str | None = None
        self.done, self.total = 0.0, 0.0
        self.t_activity = 0.0
        self.parts: tuple[int, int] | None = None
        self.part_seconds: list[float] = []
        self.t_part = 0.0
        self.progress: Any = None
        self._task: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- what the work inside reports ------------------------------------------------------------
    def report(self, activity: str, done: float, total: float) -> None:
        with self._lock:
            now = time.perf_counter()
            if activity != self.activity or done < self.done:
                self.activity, self.t_activity = activity, now  # a new activity: a new rate
            self.done, self.total = done, total

    def part(self, index: int, count: int) -> _Part:
        """``with stage.part(i, n):`` around the i-th (0-based) of n similar pieces of work."""
        return _Part(self, index, count)

    # -- what is shown -------------------------------------------------------------------------
    def left(self) -> float | None:
        with self._lock:
            now = time.perf_counter()
            left = time_left(self.done, self.total, now - self.t_activity) if self.activity else None
            if self.parts is None or left is None:
                return left
            i, n = self.parts
            this_part = now - self.t_part + left
            per_part = sum([*self.part_seconds, this_part]) / (len(self.part_seconds) + 1)
            return left + (n - i - 1) * per_part

    def info(self) -> str:
        elapsed = time.perf_counter() - self.t0
        what = ""
        if self.activity:
            total = f"/{self.total:.0f}" if self.total else ""
            what = f"{self.activity} {self.done:.0f}{total}  "
        if self.parts is not None:
            what = f"part {self.parts[0] + 1}/{self.parts[1]}  " + what
        return f"{what}elapsed {format_seconds(elapsed)}  left {format_seconds(self.left())}"

    def _tick(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(min(self.interval, 0.5)):
            if self.progress is not None:
                self.progress.update(
                    self._task,
                    completed=self.done,
                    total=self.total or None,
                    info=self.info(),
                )
            elif time.perf_counter() - last >= self.interval:
                last = time.perf_counter()
                self.echo(f"{self.label}: {self.info()}")

    def __enter__(self) -> StageProgress:
        global _stage
        self.t0 = time.perf_counter()
        if progress_enabled():
            from rich.progress import Progress

            self.progress = Progress(*progress_columns(), console=console, transient=True)
            self._task = self.progress.add_task(self.label, total=None, info=self.info())
            self.progress.start()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        _stage = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _stage
        _stage = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.progress is not None:
            self.progress.stop()


class _Part:
    def __init__(self, stage: StageProgress, index: int, count: int) -> None:
        self.stage, self.index, self.count = stage, index, count

    def __enter__(self) -> None:
        with self.stage._lock:
            self.stage.parts = (self.index, self.count)
            self.stage.t_part = time.perf_counter()
            self.stage.activity = None  # each part reports its own activity afresh

    def __exit__(self, *exc: object) -> None:
        with self.stage._lock:
            self.stage.part_seconds.append(time.perf_counter() - self.stage.t_part)
            self.stage.parts = None


_stage: StageProgress | None = None


def current_stage() -> StageProgress | None:
    return _stage


def report(activity: str, done: float, total: float) -> None:
    """Tell the running stage (if any) how far ``activity`` is: ``done`` of ``total`` units. Call it
    with ``done=0`` when the activity starts, so that its rate counts from there. Cheap otherwise."""
    if _stage is not None:
        _stage.report(activity, done, total)


def shared_progress() -> Any:
    """The running stage's rich ``Progress`` (add bars to it, do not start your own), or None."""
    return _stage.progress if _stage is not None else None


def track(
    items: Iterable[T], total: int | None = None, description: str = "", min_items: int = 200
) -> Iterator[T]:
    """rich's ``track`` for long loops; plain iteration for short ones or without a terminal.
    Inside a stage it reports every item (so the stage's time left covers the loop) and its bar
    joins the stage's display."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    name = description or "items"
    report(name, 0, total or 0)
    bar = progress_enabled() and (total is None or total >= min_items)
    shared = shared_progress() if bar else None
    if shared is not None:
        task = shared.add_task(name, total=total, info="")
        try:
            for i, item in enumerate(items):
                yield item
                shared.update(task, advance=1)
                report(name, i + 1, total or 0)
        finally:
            shared.remove_task(task)
        return
    if not bar:
        for i, item in enumerate(items):
            yield item
            report(name, i + 1, total or 0)
        return
    from rich.progress import track as rich_track

    for i, item in enumerate(
        rich_track(items, total=total, description=description, console=console, transient=True)
    ):
        yield item
        report(name, i + 1, total or 0)
