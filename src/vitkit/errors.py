"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class VitkitError(Exception):
    """A problem with the user's input (file, field, model name, data), not a bug in vitkit.

    The message must name what is wrong and what was expected, in one line.
    """

    exit_code = 2


class NonFiniteLossError(VitkitError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
