"""Option factories for every verb: help text that survives rich markup, flags without a type column.
(The help of a config field, its description and default, is :func:`vitkit.config.field_help`.)

Why a wrapper: typer renders help with rich markup, which swallowed every literal ``[default: …]``
(issue 25), and typer >= 0.2x shows ``<bool>`` in the type column of on/off flags.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape


def _is_flag(default: Any, decls: tuple[str, ...]) -> bool:
    return isinstance(default, bool) or any("/" in d for d in decls)


def Opt(default: Any = None, *decls: str, help: str | None = None, **kwargs: Any) -> Any:
    """``typer.Option`` with the help text escaped for rich and no ``<bool>`` placeholder on flags."""
    if help is not None:
        help = escape(help)
    if _is_flag(default, decls) and "metavar" not in kwargs:
        kwargs["metavar"] = ""
    return typer.Option(default, *decls, help=help, **kwargs)


def Arg(default: Any = ..., *decls: str, help: str | None = None, **kwargs: Any) -> Any:
    """``typer.Argument`` with the help text escaped for rich."""
    return typer.Argument(default, *decls, help=escape(help) if help is not None else None, **kwargs)
