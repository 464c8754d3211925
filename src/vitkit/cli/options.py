"""Option factories for every verb: help text that survives rich markup, flags without a type column,
and help generated from a pydantic config field (its description and default) instead of re-typed.

Why a wrapper: typer renders help with rich markup, which swallowed every literal ``[default: …]``
(issue 25), and typer >= 0.2x shows ``<bool>`` in the type column of on/off flags.
"""

from __future__ import annotations

from typing import Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
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


def field_default(config: type[BaseModel], field: str) -> str | None:
    """The field's default as a user would type it, or None where it has none worth showing."""
    info = config.model_fields[field]
    if info.default is PydanticUndefined:
        return None if info.default_factory is None else str(info.default_factory()) or None
    if info.default is None:
        return None
    if isinstance(info.default, bool):
        return "on" if info.default else "off"
    return str(info.default)


def field_help(config: type[BaseModel], field: str, extra: str | None = None) -> str:
    """``description [default: value]`` of a config field (the one place this text is written)."""
    info = config.model_fields[field]
    text = info.description or field.replace("_", " ")
    if extra:
        text = f"{text}; {extra}"
    default = field_default(config, field)
    return f"{text} [default: {default}]" if default not in (None, "[]", "{}") else text


def ConfigOpt(
    config: type[BaseModel], field: str, *decls: str, extra: str | None = None, **kwargs: Any
) -> Any:
    """A CLI option for ``config.field``: default None (the config decides), help from the field."""
    return Opt(None, *decls, help=field_help(config, field, extra), **kwargs)
