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


def upstream_reason(e: BaseException, limit: int = 160) -> str:
    """The gist of a library's exception for our one-line error: its first non-empty line, shortened
    at a sentence end (or else a word boundary, marked with "…") so it never stops mid-word.

    Upstream messages (torch.load, safetensors, the ONNX exporters) can be paragraphs long.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind("; "), head.rfind(": "))
    if end >= limit // 3:
        return head[: end + 1].rstrip(";:")
    cut = head.rfind(" ")
    return (head[:cut] if cut >= limit // 3 else head).rstrip(" ,;:") + "…"
